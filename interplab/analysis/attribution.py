"""Attribution patching: the first-order estimate of every patch from one forward and one backward pass.

The effect of replacing activation ``a`` of the base run by ``a'`` on the metric ``m`` is estimated as
``(a' - a) . dm/da`` with the gradient taken on the base run (the corrupted run when denoising), summed
over the patched slice. It is exact when the model is linear in the patched activation, and a cheap
map of where to look otherwise; `compare_patching` measures how well it agrees with activation patching.

>>> from interplab.analysis import LogitDiff, activation_patch
>>> metric = LogitDiff(answer=answers, wrong=wrongs)
>>> approx = attribution_patch(model, clean, corrupted, metric, "z")
>>> exact = activation_patch(model, clean, corrupted, metric, "z")
>>> comparison = compare_patching(exact, approx)
>>> -1.0 <= comparison.correlation <= 1.0      # near 1 where the model is near-linear in z
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interplab import plots
from interplab.analysis.metrics import Metric
from interplab.analysis.patching import prepare_patches, run_metric
from interplab.analysis.targets import (
    Direction,
    PatchResult,
    PatchTarget,
    result_labels,
    site_of,
)
from interplab.hooks.site import Site
from interplab.model.transformer import Transformer


def _reduce(target: PatchTarget, prod: Tensor, by_position: bool) -> Tensor:
    """(diff * grad) [batch ...] -> [batch, (pos), (unit)] summed over everything a patch replaces."""
    if target.resid_like:
        return prod.sum(-1)  # batch pos
    if target is PatchTarget.PATTERN:
        r = prod.sum(-1).transpose(1, 2)  # batch q head
    elif target.per_head:
        r = prod.sum(-1)  # batch pos head
    else:
        r = prod  # batch pos neuron
    return r if by_position else r.sum(1)


def attribution_patch(
    model: Transformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    target: PatchTarget | str,
    *,
    by_position: bool | None = None,
    direction: Direction | str = Direction.DENOISE,
    layers: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
) -> PatchResult:
    """Estimated metric after each patch (same layout and meaning as `activation_patch`'s result):
    base metric + (source - base activation) . gradient, per example. Two forward passes (the source
    run under no_grad) and one backward pass in all."""
    plan = prepare_patches(
        model,
        clean_tokens,
        corrupted_tokens,
        target,
        direction,
        attention_mask,
        by_position=by_position,
        layers=layers,
        indices=indices,
        positions=positions,
    )
    target, patches, dims = plan.target, plan.patches, plan.dims
    by_pos = "pos" in dims
    layer_list = sorted({p.layer for p in patches})
    names = [site_of(target, layer).name for layer in layer_list]
    b = plan.clean.shape[0]
    with torch.no_grad():
        src_values, src_cache, _ = run_metric(
            model, plan.source, metric, names, attention_mask=attention_mask
        )

    def leaf(act: Tensor, site: Site) -> Tensor:
        # a leaf that needs a gradient, so frozen weights still give activation gradients
        return act.detach().requires_grad_(True)

    with torch.enable_grad():
        base_values, cache, _ = run_metric(
            model,
            plan.base,
            metric,
            names,
            grad=True,
            fwd_hooks=[("hook_embed", leaf)],
            attention_mask=attention_mask,
        )
        acts = [cache[name] for name in names]
        grads = torch.autograd.grad(base_values.sum(), acts, allow_unused=True)
    pos_list = sorted({p.pos for p in patches if p.pos is not None}, key=[p.pos for p in patches].index)
    idx_list = sorted({p.index for p in patches if p.index is not None}, key=[p.index for p in patches].index)
    per_layer = []
    for name, act, grad in zip(names, acts, grads, strict=True):
        grad = torch.zeros_like(act) if grad is None else grad
        r = _reduce(target, ((src_cache[name] - act.detach()) * grad).detach(), by_pos)
        if by_pos:
            r = r[:, pos_list]
        if idx_list:
            r = r[..., idx_list]
        per_layer.append(r.movedim(0, -1))  # [(pos), (unit), batch]
    delta = torch.stack(per_layer).reshape(*plan.shape, b)
    per = base_values.detach() + delta
    clean_m, corr_m = (
        (src_values, base_values) if plan.direction is Direction.DENOISE else (base_values, src_values)
    )
    return PatchResult(
        values=per.mean(-1),
        per_example=per,
        dims=dims,
        target=target,
        direction=plan.direction,
        labels=result_labels(model, dims, plan.clean, layers, indices, positions, target),
        method="attribution",
        clean_metric=float(clean_m.detach().mean()),
        corrupted_metric=float(corr_m.detach().mean()),
    )


@dataclass(frozen=True)
class PatchingComparison:
    """Activation patching against attribution patching, as effects (patched metric - base metric)."""

    activation: Tensor
    """exact effect of each patch (flattened)"""
    attribution: Tensor
    """estimated effect of each patch (flattened)"""
    labels: tuple[str, ...]
    """one label per patch, e.g. 'L1 pos 3:the H2'"""
    correlation: float
    """Pearson correlation of the two effects"""
    max_abs_error: float
    """largest |attribution - activation|"""

    def __repr__(self) -> str:
        return (
            f"PatchingComparison({len(self.labels)} patches: correlation {self.correlation:.4f}, "
            f"max |error| {self.max_abs_error:.4g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "correlation": self.correlation,
            "max_abs_error": self.max_abs_error,
            "labels": list(self.labels),
            "activation": self.activation.tolist(),
            "attribution": self.attribution.tolist(),
        }

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        return plots.scatter(
            self.activation,
            self.attribution,
            labels=self.labels,
            diagonal=True,
            x_title="activation patching effect",
            y_title="attribution patching estimate",
            title=title or f"attribution vs activation patching (r = {self.correlation:.3f})",
        )

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def compare_patching(activation: PatchResult, attribution: PatchResult) -> PatchingComparison:
    """Correlation and scatter plot of two patching results of the same target and layout."""
    if activation.dims != attribution.dims or activation.values.shape != attribution.values.shape:
        raise ValueError(
            f"results differ in layout: {activation.dims} {tuple(activation.values.shape)} vs "
            f"{attribution.dims} {tuple(attribution.values.shape)}"
        )
    if activation.target is not attribution.target or activation.direction is not attribution.direction:
        raise ValueError(
            f"results patch different things: {activation.target.value}/{activation.direction.value} "
            f"vs {attribution.target.value}/{attribution.direction.value}"
        )
    base = (
        activation.corrupted_metric if activation.direction is Direction.DENOISE else activation.clean_metric
    )
    x = (activation.values - base).reshape(-1).double()
    y = (attribution.values - base).reshape(-1).double()
    xc, yc = x - x.mean(), y - y.mean()
    denom = float(xc.norm() * yc.norm())
    corr = float((xc * yc).sum()) / denom if denom > 0 else float("nan")
    labels = [""]
    for d in activation.dims:
        prefix = {"layer": "L", "pos": "pos ", "head": "", "neuron": ""}[d]
        labels = [f"{a} {prefix}{b}".strip() for a in labels for b in activation.labels[d]]
    return PatchingComparison(
        activation=x.float(),
        attribution=y.float(),
        labels=tuple(labels),
        correlation=corr,
        max_abs_error=float((x - y).abs().max()) if x.numel() else 0.0,
    )
