"""What a patch replaces: `PatchTarget` (the activation kind), the list of individual patches, and
`PatchResult`, shared by activation patching and attribution patching.

A target is patched over every layer, and over positions and/or heads/neurons:

=================  ==============================  ======================================
target             all positions (default)         ``by_position=True``
=================  ==============================  ======================================
resid_pre/mid/post  --                             (layer, pos)
attn_out, mlp_out   --                             (layer, pos)
z, q, k, v          (layer, head)                  (layer, pos, head)
pattern             (layer, head)                  (layer, pos, head)  (pos = query position)
mlp_post            (layer, neuron)                (layer, pos, neuron)
=================  ==============================  ======================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab import plots
from interplab.hooks.site import Site, SiteKind
from interplab.model import Transformer


class PatchTarget(str, Enum):
    """The activation kind a patch replaces."""

    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"
    Z = "z"  # head outputs (before W_O)
    Q = "q"
    K = "k"
    V = "v"
    PATTERN = "pattern"
    MLP_POST = "mlp_post"  # neurons

    @property
    def kind(self) -> SiteKind:
        return _KINDS[self]

    @property
    def per_head(self) -> bool:
        return self in (PatchTarget.Z, PatchTarget.Q, PatchTarget.K, PatchTarget.V, PatchTarget.PATTERN)

    @property
    def per_neuron(self) -> bool:
        return self is PatchTarget.MLP_POST

    @property
    def resid_like(self) -> bool:
        return not (self.per_head or self.per_neuron)


_KINDS = {
    PatchTarget.RESID_PRE: SiteKind.RESID_PRE,
    PatchTarget.RESID_MID: SiteKind.RESID_MID,
    PatchTarget.RESID_POST: SiteKind.RESID_POST,
    PatchTarget.ATTN_OUT: SiteKind.ATTN_OUT,
    PatchTarget.MLP_OUT: SiteKind.MLP_OUT,
    PatchTarget.Z: SiteKind.Z,
    PatchTarget.Q: SiteKind.Q,
    PatchTarget.K: SiteKind.K,
    PatchTarget.V: SiteKind.V,
    PatchTarget.PATTERN: SiteKind.PATTERN,
    PatchTarget.MLP_POST: SiteKind.MLP_POST,
}


class Direction(str, Enum):
    """Denoising: run the corrupted input, patch clean activations in. Noising: the reverse."""

    DENOISE = "denoise"
    NOISE = "noise"


@dataclass(frozen=True)
class Patch:
    """One patch: the activation at ``layer`` (at query position ``pos``, all if None; head or neuron
    ``index``, all if None) takes the source run's value."""

    layer: int
    pos: int | None
    index: int | None


def parse_target(target: PatchTarget | str) -> PatchTarget:
    try:
        return PatchTarget(target)
    except ValueError:
        valid = ", ".join(t.value for t in PatchTarget)
        raise ValueError(f"unknown patch target {target!r}; valid: {valid}") from None


def n_units(model: Transformer, target: PatchTarget) -> int:
    """Heads (key/value heads for k and v under GQA) or neurons per layer; 1 for residual targets."""
    cfg = model.cfg
    if target in (PatchTarget.K, PatchTarget.V):
        return cfg.n_kv_heads
    if target.per_head:
        return cfg.n_heads
    if target.per_neuron:
        return cfg.d_mlp
    return 1


def plan_patches(
    model: Transformer,
    target: PatchTarget,
    n_pos: int,
    *,
    by_position: bool | None,
    layers: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> tuple[list[Patch], tuple[str, ...], tuple[int, ...]]:
    """Every patch of a target, the result's dimension names and shape (patches are in row-major order)."""
    cfg = model.cfg
    if target.kind is SiteKind.RESID_MID and (cfg.attn_only or cfg.parallel_attn_mlp):
        raise ValueError(f"target {target.value!r}: this model's blocks have no resid_mid")
    if target in (PatchTarget.MLP_OUT, PatchTarget.MLP_POST) and not cfg.has_mlp:
        raise ValueError(f"target {target.value!r}: the model is attention-only")
    layers = list(range(cfg.n_layers)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < cfg.n_layers:
            raise ValueError(
                f"unknown layer {layer}: the model has {cfg.n_layers} layers (0..{cfg.n_layers - 1})"
            )
    if target.resid_like:
        if by_position is False:
            raise ValueError(
                f"target {target.value!r} is patched by position; by_position=False is not supported"
            )
        by_position = True
    by_position = bool(by_position)
    pos_list = list(range(n_pos)) if positions is None else [p + n_pos if p < 0 else p for p in positions]
    for p in pos_list:
        if not 0 <= p < n_pos:
            raise ValueError(f"position {p} out of range for inputs of {n_pos} positions")
    units = n_units(model, target)
    if target.resid_like:
        if indices is not None:
            raise ValueError(f"target {target.value!r} has no heads or neurons to select")
        idx: list[int | None] = [None]
    else:
        idx = list(range(units)) if indices is None else list(indices)
        what = "head" if target.per_head else "neuron"
        for i in idx:
            if not isinstance(i, int) or not 0 <= i < units:
                raise ValueError(f"unknown {what} index {i!r}: layers have {units} {what}s (0..{units - 1})")
    pos_axis: list[int | None] = list(pos_list) if by_position else [None]
    patches = [Patch(layer, p, i) for layer in layers for p in pos_axis for i in idx]
    dims = ["layer"] + (["pos"] if by_position else [])
    shape = [len(layers)] + ([len(pos_list)] if by_position else [])
    if not target.resid_like:
        dims.append("head" if target.per_head else "neuron")
        shape.append(len(idx))
    return patches, tuple(dims), tuple(shape)


def selection(target: PatchTarget, pos: int | None, index: int | None) -> tuple:
    """Index into one run's activation ([batch ...], query positions relative to the run's first)."""
    every = slice(None)
    p = every if pos is None else pos
    if target.resid_like:
        return (every, p)
    if target is PatchTarget.PATTERN:  # [batch head q k]
        return (every, index, p)
    return (every, p, index)  # [batch pos head d_head] or [batch pos d_mlp]


def pos_dim(target: PatchTarget) -> int:
    """The query-position dimension of the target's activation."""
    return 2 if target is PatchTarget.PATTERN else 1


def site_of(target: PatchTarget, layer: int) -> Site:
    return Site(target.kind, layer)


def token_labels(model: Transformer, tokens: Tensor) -> tuple[str, ...]:
    """``"i:token"`` for each position of one sequence (ids when the model has no tokenizer)."""
    ids = [int(t) for t in tokens]
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        try:
            strs = [tok.decode([i]) for i in ids]
        except Exception:  # noqa: BLE001 - a label is never worth an error
            strs = [str(i) for i in ids]
    else:
        strs = [str(i) for i in ids]
    return tuple(f"{i}:{s}" for i, s in enumerate(strs))


@dataclass(frozen=True)
class PatchResult:
    """The metric after each patch (mean over the batch), with labelled dimensions.

    ``values[layer, (pos,) (head|neuron)]``; ``per_example`` adds a trailing batch dimension."""

    values: Tensor
    """mean patched metric per patch"""
    per_example: Tensor
    """patched metric per patch and example [..., batch]"""
    dims: tuple[str, ...]
    """dimension names of ``values``: layer, pos, head or neuron"""
    labels: dict[str, tuple[str, ...]] = field(hash=False)
    """tick labels per dimension"""
    target: PatchTarget
    """what was patched"""
    direction: Direction
    """denoising or noising"""
    method: str
    """'activation' (batched forward passes) or 'attribution' (gradient approximation)"""
    clean_metric: float
    """mean metric of the clean run"""
    corrupted_metric: float
    """mean metric of the corrupted run"""

    def __repr__(self) -> str:
        shape = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape, strict=True))
        return (
            f"PatchResult({self.method} {self.direction.value} {self.target.value}: {shape}; "
            f"clean {self.clean_metric:.4g}, corrupted {self.corrupted_metric:.4g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.value,
            "direction": self.direction.value,
            "method": self.method,
            "dims": list(self.dims),
            "labels": {k: list(v) for k, v in self.labels.items()},
            "values": self.values.tolist(),
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
        }

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure (lazy import)
        """A heatmap (facets over heads/neurons when patched by position)."""

        title = title or f"{self.method} patching ({self.direction.value}) of {self.target.value}"
        v = self.values.detach().float().cpu()
        if v.dim() == 2:
            x, y = self.dims[1], self.dims[0]
            return plots.heatmap(
                v,
                x_labels=self.labels[x],
                y_labels=self.labels[y],
                x_title=x,
                y_title=y,
                title=title,
                colorbar_title="metric",
            )
        # (layer, pos, unit): rows layer.unit, columns positions
        layer_l, pos_l, unit_l = (self.labels[d] for d in self.dims)
        rows = [f"L{lay} {u}" for lay in layer_l for u in unit_l]
        flat = v.permute(0, 2, 1).reshape(len(rows), -1)
        return plots.heatmap(
            flat,
            x_labels=pos_l,
            y_labels=rows,
            x_title="pos",
            y_title=f"layer, {self.dims[2]}",
            title=title,
            colorbar_title="metric",
        )

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def result_labels(
    model: Transformer,
    dims: Sequence[str],
    tokens: Tensor,
    layers: Sequence[int] | None,
    indices: Sequence[int] | None,
    positions: Sequence[int] | None,
    target: PatchTarget,
) -> dict[str, tuple[str, ...]]:
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    out: dict[str, tuple[str, ...]] = {"layer": tuple(str(layer) for layer in layers)}
    toks = token_labels(model, tokens[0])
    if "pos" in dims:
        pos = range(tokens.shape[1]) if positions is None else [p % tokens.shape[1] for p in positions]
        out["pos"] = tuple(toks[p] for p in pos)
    units = range(n_units(model, target)) if indices is None else indices
    if "head" in dims:
        out["head"] = tuple(f"H{h}" for h in units)
    if "neuron" in dims:
        out["neuron"] = tuple(f"N{n}" for n in units)
    return out


def as_values(flat: list[Tensor], shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per-patch per-example metric values -> (mean values, per_example) in the result's shape."""
    per = torch.stack(flat).view(*shape, -1)
    return per.mean(-1), per
