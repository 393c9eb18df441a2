"""Expand a Transformer's MLPs with extra hidden units, and ablate (delete) them again.

The expanded model computes exactly what the original computed: the new units' output weights start at zero.
Their input weights are random, so they receive gradient once their output weights move.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from interplab.hooks.site import Site, SiteKind
from interplab.model import Transformer
from interplab.routing.params import ParamRoute


@dataclass(frozen=True, kw_only=True)
class Expansion:
    """Where the extra units of an expanded model are: hidden units ``d_mlp_orig ..`` of ``layers``."""

    d_mlp_orig: int
    """hidden width of the original MLPs (units 0 .. d_mlp_orig-1 are the original ones)"""
    n_units: int
    """extra hidden units per expanded layer"""
    layers: tuple[int, ...]
    """the expanded layers (others carry zero, frozen-at-zero units because d_mlp is one number per model)"""
    gated: bool = False
    """the MLPs are gated (W_gate grows too)"""
    gate_bias: bool = False
    """the gates have biases (b_gate grows too)"""

    def unit_mask(self, *, extra: float, original: float) -> Tensor:
        """A [d_mlp] vector: ``original`` on the original units, ``extra`` on the new ones."""
        mask = torch.full((self.d_mlp_orig + self.n_units,), float(original))
        mask[self.d_mlp_orig :] = float(extra)
        return mask

    def param_route(self, *, extra: float, rest: float) -> ParamRoute:
        """Weight ``extra`` on the expansion's parameters (its rows/columns of W_in, b_in, W_gate, W_out) and
        ``rest`` on every other parameter (original units included)."""
        weights: dict[str, float | Tensor] = {}
        m = self.unit_mask(extra=extra, original=rest)
        for layer in self.layers:
            prefix = f"blocks.{layer}.mlp."
            weights[prefix + "W_in"] = m[None, :]
            if self.gated:
                weights[prefix + "W_gate"] = m[None, :]
            weights[prefix + "b_in"] = m
            if self.gate_bias:
                weights[prefix + "b_gate"] = m
            weights[prefix + "W_out"] = m[:, None]
        return ParamRoute(weights=weights, default=rest)

    def sites(self) -> list[str]:
        """The hook names of the expanded MLPs' hidden activations (``blocks.L.mlp.hook_post``)."""
        return [Site(SiteKind.MLP_POST, layer).name for layer in self.layers]


def expand_mlp(
    model: Transformer, n_units: int, *, layers: Sequence[int] | None = None, seed: int = 0
) -> tuple[Transformer, Expansion]:
    """A new Transformer whose MLPs in ``layers`` (all by default) have ``n_units`` extra hidden units with
    random input weights (std ``init_range``) and zero output weights: same function, more capacity."""
    cfg = model.cfg
    if not cfg.has_mlp:
        raise ValueError("expand_mlp needs a model with MLPs; this one is attention-only")
    if not isinstance(n_units, int) or n_units <= 0:
        raise ValueError(f"n_units must be a positive int, got {n_units!r}")
    chosen = tuple(range(cfg.n_layers)) if layers is None else tuple(sorted(set(layers)))
    bad = [layer for layer in chosen if not 0 <= layer < cfg.n_layers]
    if bad or not chosen:
        raise ValueError(f"layers {list(layers or [])} must be in 0..{cfg.n_layers - 1}")
    m = cfg.d_mlp
    assert m is not None
    new = Transformer(cfg.replace(d_mlp=m + n_units), init=False).to(model.W_E.device)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        target = new.state_dict()[name]
        if target.shape == value.shape:
            state[name] = value
            continue
        layer = int(name.split(".")[1])
        grown = torch.zeros(target.shape, dtype=value.dtype)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("W_in", "W_gate"):
            grown[:, :m] = value
            if layer in chosen:
                grown[:, m:] = torch.randn(target.shape[0], n_units, generator=gen) * cfg.init_range
        elif leaf in ("b_in", "b_gate"):
            grown[:m] = value
        elif leaf == "W_out":
            grown[:m] = value
        else:
            raise AssertionError(f"unexpected resized parameter {name}")
        state[name] = grown.to(value.device)
    new.load_state_dict(state)
    new.train(model.training)
    new.tokenizer = model.tokenizer
    return new, Expansion(
        d_mlp_orig=m,
        n_units=n_units,
        layers=chosen,
        gated=cfg.gated_mlp,
        gate_bias=cfg.gated_mlp and cfg.gate_bias,
    )


def ablate_expansion(model: Transformer, expansion: Expansion) -> Transformer:
    """A Transformer with the original MLP width: the expansion's units deleted (their contribution removed)."""
    m = expansion.d_mlp_orig
    if model.cfg.d_mlp != m + expansion.n_units:
        raise ValueError(
            f"the model has d_mlp={model.cfg.d_mlp}, but the expansion needs {m} + {expansion.n_units} units"
        )
    new = Transformer(model.cfg.replace(d_mlp=m), init=False).to(model.W_E.device)
    state = {}
    for name, value in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if ".mlp." in name and leaf in ("W_in", "W_gate"):
            value = value[:, :m]
        elif ".mlp." in name and leaf in ("b_in", "b_gate", "W_out"):
            value = value[:m]
        state[name] = value.clone()
    new.load_state_dict(state)
    new.train(model.training)
    new.tokenizer = model.tokenizer
    return new
