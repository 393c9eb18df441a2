"""Ablations as hooks: zero, mean (over a reference dataset) and resample (from other inputs), restricted
to heads, neurons, positions or a boolean mask. Each function returns a ``(site, hook)`` pair; several
compose by listing them (hooks at one site run in order):

>>> hooks = [zero_ablation("blocks.1.attn.hook_z", heads=[3]),
...          mean_ablation("blocks.0.mlp.hook_post", reference, neurons=[7, 9])]
>>> logits = model.run_with_hooks(tokens, hooks)

Where heads and positions live depends on the site: ``[batch pos head d_head]`` for q/k/v/z/result,
``[batch head query key]`` for the pattern and scores (positions are query positions), and
``[batch pos d]`` otherwise (``neurons`` index the last dimension).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from interplab.hooks.points import HookFn
from interplab.hooks.site import Site, SiteKind

_HEAD_KINDS = {
    SiteKind.Q,
    SiteKind.K,
    SiteKind.V,
    SiteKind.Z,
    SiteKind.RESULT,
    SiteKind.ROT_Q,
    SiteKind.ROT_K,
    SiteKind.Q_NORM_NORMALIZED,
    SiteKind.K_NORM_NORMALIZED,
    SiteKind.ATTN_IN,
    SiteKind.Q_INPUT,
    SiteKind.K_INPUT,
    SiteKind.V_INPUT,
}
_PATTERN_KINDS = {SiteKind.PATTERN, SiteKind.ATTN_SCORES}


class Ablation(str, Enum):
    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"


def _dims(kind: SiteKind) -> tuple[int | None, int]:
    """(head dim, position dim) of a site's activation."""
    if kind in _HEAD_KINDS:
        return 2, 1
    if kind in _PATTERN_KINDS:
        return 1, 2
    return None, 1


def _index_mask(size: int, idx: Sequence[int], what: str) -> Tensor:
    m = torch.zeros(size, dtype=torch.bool)
    for i in idx:
        if not -size <= int(i) < size:
            raise ValueError(f"unknown {what} index {i}: the activation has {size} {what}s (0..{size - 1})")
        m[int(i)] = True
    return m


def selection_mask(
    site: Site,
    shape: tuple[int, ...],
    *,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """A boolean mask (broadcastable to ``shape``) of the entries an ablation replaces."""
    head_dim, pos_dim = _dims(site.kind)
    out = torch.ones([1] * len(shape), dtype=torch.bool)

    def along(dim: int, m: Tensor) -> Tensor:
        view = [1] * len(shape)
        view[dim] = shape[dim]
        return m.view(view)

    if heads is not None:
        if head_dim is None:
            raise ValueError(
                f"{site.name} has no head dimension; heads= applies to q/k/v/z/result/pattern sites"
            )
        out = out & along(head_dim, _index_mask(shape[head_dim], heads, "head"))
    if neurons is not None:
        if head_dim is not None:
            raise ValueError(f"{site.name} is per head; neurons= applies to [batch pos d] sites")
        out = out & along(len(shape) - 1, _index_mask(shape[-1], neurons, "neuron"))
    if positions is not None:
        out = out & along(pos_dim, _index_mask(shape[pos_dim], positions, "position"))
    if mask is not None:
        mask = mask.to(torch.bool).cpu()
        try:
            torch.broadcast_shapes(mask.shape, shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to {site.name}'s {shape}"
            ) from None
        out = out & mask
    return out


def _hook(site: Site, value_fn, heads, neurons, positions, mask) -> tuple[str, HookFn]:
    def ablate(act: Tensor, s: Site) -> Tensor:
        sel = selection_mask(
            s, tuple(act.shape), heads=heads, neurons=neurons, positions=positions, mask=mask
        )
        return torch.where(sel.to(act.device), value_fn(act).to(act.dtype), act)

    return site.name, ablate


def zero_ablation(
    site: str | Site | tuple,
    *,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    mask: Tensor | None = None,
) -> tuple[str, HookFn]:
    """Set the selected entries to zero."""
    return _hook(Site.parse(site), torch.zeros_like, heads, neurons, positions, mask)


def mean_ablation(
    site: str | Site | tuple,
    reference: Tensor,
    *,
    per_position: bool = False,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    mask: Tensor | None = None,
) -> tuple[str, HookFn]:
    """Replace the selected entries by their mean over ``reference`` (the site's activation on a reference
    dataset, e.g. ``model.run_with_cache(ref_tokens, site)[1][site]``): over examples and positions, or
    over examples only with ``per_position`` (then inputs must have the reference's length)."""
    site = Site.parse(site)
    _, pos_dim = _dims(site.kind)
    dims = (0,) if per_position else (0, pos_dim)
    mean = reference.float().mean(dim=dims, keepdim=True)

    def value(act: Tensor) -> Tensor:
        if per_position and act.shape[pos_dim] != mean.shape[pos_dim]:
            raise ValueError(
                f"per-position mean of {mean.shape[pos_dim]} positions, input has {act.shape[pos_dim]}"
            )
        try:
            return mean.to(act.device).expand_as(act)
        except RuntimeError:
            raise ValueError(
                f"reference activations {tuple(reference.shape)} do not match {site.name}'s "
                f"{tuple(act.shape)}"
            ) from None

    return _hook(site, value, heads, neurons, positions, mask)


def resample_ablation(
    site: str | Site | tuple,
    reference: Tensor,
    *,
    seed: int = 0,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    mask: Tensor | None = None,
) -> tuple[str, HookFn]:
    """Replace the selected entries by those of a randomly chosen reference input (one draw per example,
    reproducible with ``seed``); ``reference`` is the site's activation on other inputs of the same length."""
    site = Site.parse(site)
    g = torch.Generator().manual_seed(seed)

    def value(act: Tensor) -> Tensor:
        if reference.shape[1:] != act.shape[1:]:
            raise ValueError(
                f"reference activations {tuple(reference.shape)} do not match {site.name}'s "
                f"{tuple(act.shape)} beyond the batch"
            )
        idx = torch.randint(0, reference.shape[0], (act.shape[0],), generator=g)
        return reference[idx].to(act.device)

    return _hook(site, value, heads, neurons, positions, mask)


def ablation(
    kind: Ablation | str, site: str | Site | tuple, reference: Tensor | None = None, **kwargs
) -> tuple[str, HookFn]:
    """Any ablation by kind (for configs and the CLI)."""
    kind = Ablation(kind)
    if kind is Ablation.ZERO:
        return zero_ablation(site, **kwargs)
    if reference is None:
        raise ValueError(f"{kind.value} ablation needs reference activations")
    return (mean_ablation if kind is Ablation.MEAN else resample_ablation)(site, reference, **kwargs)
