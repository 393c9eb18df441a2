"""Parameter groups: which parameters (or slices of them, such as one head or one neuron) to attribute through.

Specs, as strings (CLI) or built directly:

- ``all``: every trainable parameter
- ``layer:L``: everything in block L
- ``attn:L`` / ``mlp:L``: one block's attention or MLP weights
- ``head:L.H``: W_Q, W_K, W_V, W_O (and b_Q, b_K, b_V) of head H in layer L
- ``neuron:L.N``: W_in[:, N], b_in[N], W_out[N] (and W_gate[:, N]) of MLP neuron N in layer L
- ``embed`` / ``unembed``
- ``re:REGEX``: parameters whose name matches the regular expression
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamSlice:
    """One parameter, optionally restricted to ``index`` along dimension ``dim``."""

    name: str
    dim: int | None = None
    index: int | None = None


@dataclass(frozen=True)
class ParamGroup:
    """A named set of parameter slices; `numel` is the length of its flattened gradient."""

    spec: str
    slices: tuple[ParamSlice, ...]
    numel: int

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.name for s in self.slices))

    def flatten(self, grads: dict[str, Tensor], batched: bool = False) -> Tensor:
        """Concatenate the selected slices of ``grads`` ([n, ...] per parameter if batched) into [n, numel]."""
        parts = []
        for s in self.slices:
            g = grads[s.name]
            if s.dim is not None and s.index is not None:  # set together (one head or neuron)
                g = g.select(s.dim + (1 if batched else 0), s.index)
            parts.append(g.reshape(g.shape[0], -1) if batched else g.reshape(-1))
        return torch.cat(parts, dim=-1)


def param_group(model: nn.Module, spec: str) -> ParamGroup:
    """Resolve a spec (see the module docstring) against a model; unknown specs give a clear error."""
    params = dict(model.named_parameters())
    cfg = getattr(model, "cfg", None)
    kind, _, arg = spec.partition(":")
    slices: list[ParamSlice]

    def layer_of(value: str) -> int:
        layer = _int(value, spec)
        n_layers = getattr(cfg, "n_layers", None)
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ValueError(
                f"parameter group {spec!r}: layer {layer} does not exist (the model has {n_layers} layers)"
            )
        return layer

    def names(pred: Callable[[str], bool]) -> list[ParamSlice]:
        return [ParamSlice(n) for n, p in params.items() if p.requires_grad and pred(n)]

    if kind == "all" and not arg:
        slices = names(lambda n: True)
    elif kind == "layer":
        layer = layer_of(arg)
        slices = names(lambda n: n.startswith(f"blocks.{layer}."))
    elif kind in ("attn", "mlp"):
        layer = layer_of(arg)
        slices = names(lambda n: n.startswith(f"blocks.{layer}.{kind}."))
    elif kind == "embed" and not arg:
        slices = names(lambda n: n.startswith(("embed.", "pos_embed.")))
    elif kind == "unembed" and not arg:
        slices = names(lambda n: n.startswith(("unembed.", "ln_final.")))
    elif kind == "head":
        layer_s, _, head_s = arg.partition(".")
        layer, head = layer_of(layer_s), _int(head_s, spec)
        n_heads = getattr(cfg, "n_heads", None)
        if n_heads is not None and not 0 <= head < n_heads:
            raise ValueError(
                f"parameter group {spec!r}: head {head} does not exist (layer {layer} has {n_heads} heads)"
            )
        if getattr(cfg, "n_kv_heads", n_heads) != n_heads:
            raise ValueError(f"parameter group {spec!r}: per-head groups need n_kv_heads == n_heads")
        pre = f"blocks.{layer}.attn."
        slices = [
            ParamSlice(pre + w, 0, head)
            for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
            if pre + w in params and params[pre + w].requires_grad
        ]
    elif kind == "neuron":
        layer_s, _, n_s = arg.partition(".")
        layer, neuron = layer_of(layer_s), _int(n_s, spec)
        pre = f"blocks.{layer}.mlp."
        if pre + "W_in" not in params:
            raise ValueError(f"parameter group {spec!r}: layer {layer} has no MLP")
        d_mlp = params[pre + "W_in"].shape[1]
        if not 0 <= neuron < d_mlp:
            raise ValueError(f"parameter group {spec!r}: neuron {neuron} does not exist (d_mlp={d_mlp})")
        slices = [ParamSlice(pre + "W_in", 1, neuron), ParamSlice(pre + "W_out", 0, neuron)]
        if pre + "W_gate" in params:
            slices.append(ParamSlice(pre + "W_gate", 1, neuron))
        for bias in ("b_in", "b_gate"):  # (b_gate: a gated MLP with gate biases, Llama's mlp_bias)
            if pre + bias in params and params[pre + bias].requires_grad:
                slices.append(ParamSlice(pre + bias, 0, neuron))
    elif kind == "re":
        pattern = re.compile(arg)
        slices = names(lambda n: pattern.search(n) is not None)
    else:
        raise ValueError(
            f"unknown parameter group {spec!r}; valid: all, layer:L, attn:L, mlp:L, head:L.H, neuron:L.N, embed, "
            "unembed, re:REGEX"
        )
    if not slices:
        raise ValueError(f"parameter group {spec!r} selects no trainable parameter of this model")
    numel = 0
    for s in slices:
        t = params[s.name]
        numel += t.numel() // (t.shape[s.dim] if s.dim is not None else 1)
    return ParamGroup(spec, tuple(slices), numel)


def _int(value: str, spec: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"parameter group {spec!r}: {value!r} is not an integer index") from None
