"""Activation patching, batched.

Each patch replaces one activation of a *base* run (the corrupted run when denoising, the clean run
when noising) with the *source* run's value and records a metric of the resulting logits. Instead of
one full forward pass per patch, patches are evaluated together and only what a patch can change is
computed:

- the forward starts at the patched layer, from the base run's cached residual stream;
- causal attention cannot carry a patch at position ``p`` backwards, so only positions ``>= p`` are
  recomputed; earlier positions' keys and values come from the base run's cache;
- only the positions the metric reads are unembedded (metrics that say which, e.g. `LogitDiff`);
- patched copies are stacked along the batch, in chunks bounded by ``PatchConfig.max_batch_tokens``.

The result equals one forward pass per patch (`activation_patch_loop`, the reference) to float precision.

>>> from interplab.analysis import LogitDiff, activation_patch
>>> metric = LogitDiff(answer=answers, wrong=wrongs)
>>> result = activation_patch(model, clean, corrupted, metric, "resid_pre")
>>> result.values.shape, result.dims
(torch.Size([2, 16]), ('layer', 'pos'))
>>> result.save("resid_patching.json")
PosixPath('resid_patching.json')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.analysis.metrics import Metric, PositionMetric, check_metric_output
from interplab.analysis.targets import (
    Direction,
    Patch,
    PatchResult,
    PatchTarget,
    as_values,
    parse_target,
    plan_patches,
    pos_dim,
    result_labels,
    selection,
    site_of,
)
from interplab.hooks.cache import ActivationCache
from interplab.hooks.site import Site, SiteKind
from interplab.model.attention import AttnContext
from interplab.model.kv_cache import KVCache
from interplab.model.transformer import Transformer


@dataclass(frozen=True, kw_only=True)
class PatchConfig:
    """How patches are batched."""

    max_batch_tokens: int = 4096
    """most (stacked rows x recomputed positions) in one forward pass: bounds memory and cache traffic"""
    reuse_prefix: bool = True
    """recompute only positions at and after the patched one (reusing cached keys/values before it)"""

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive int, got {self.max_batch_tokens!r}")


def check_pair(
    model: Transformer, clean: Tensor, corrupted: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Validate a clean/corrupted pair of token batches (same shape, integer ids in the vocabulary)."""
    clean, corrupted = torch.as_tensor(clean), torch.as_tensor(corrupted)
    if clean.dim() == 1:
        clean = clean[None]
    if corrupted.dim() == 1:
        corrupted = corrupted[None]
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean tokens have shape {tuple(clean.shape)} but corrupted tokens {tuple(corrupted.shape)}; "
            "patching needs aligned inputs of the same shape"
        )
    if clean.dim() != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(clean.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(clean.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(clean.shape)}"
        )
    dev = model.W_E.device
    return model.check_tokens(clean.to(dev)), model.check_tokens(corrupted.to(dev))


def run_metric(
    model: Transformer,
    tokens: Tensor,
    metric: Metric,
    names: Sequence[str],
    *,
    attention_mask: Tensor | None = None,
    grad: bool = False,
    fwd_hooks: Sequence = (),
    kv_cache: KVCache | None = None,
) -> tuple[Tensor, ActivationCache, Tensor | None]:
    """One run: metric values [batch], a cache of ``names`` and the logits. A `PositionMetric` has only its
    read positions unembedded (the logits are then None)."""
    b, n_pos = tokens.shape
    kw: dict[str, Any] = dict(
        attention_mask=attention_mask, grad=grad, fwd_hooks=fwd_hooks, kv_cache=kv_cache
    )
    if isinstance(metric, PositionMetric):
        resid, cache = model.run_with_cache(tokens, list(names), stop_at_layer=model.cfg.n_layers, **kw)
        read = metric.read_positions(b, n_pos, resid.device)
        final = model.unembed_resid(resid[torch.arange(b, device=resid.device), read])
        return check_metric_output(metric.from_final(final), b), cache, None
    logits, cache = model.run_with_cache(tokens, list(names), **kw)
    return check_metric_output(metric(logits), b), cache, logits


def source_activations(
    model: Transformer,
    tokens: Tensor,
    metric: Metric,
    target: PatchTarget,
    layers: Sequence[int],
    attention_mask: Tensor | None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Metric values and the target's activation at each layer for one run."""
    names = [site_of(target, layer).name for layer in layers]
    values, cache, _ = run_metric(model, tokens, metric, names, attention_mask=attention_mask)
    return values, {layer: cache[site_of(target, layer).name] for layer in layers}


# targets whose hooks fire in `Block.finish`: patched there, they need every position of the last block
_IN_FINISH = frozenset(
    {PatchTarget.RESID_MID, PatchTarget.RESID_POST, PatchTarget.MLP_OUT, PatchTarget.MLP_POST}
)


class _BaseRun:
    """The base run's cached residual stream, keys and values, logits and metric values."""

    def __init__(self, model: Transformer, tokens: Tensor, mask: Tensor | None, metric: Metric) -> None:
        cfg = model.cfg
        self.model, self.tokens, self.mask, self.metric = model, tokens, mask, metric
        self.kv = model.new_kv_cache()
        names = [Site(SiteKind.RESID_PRE, layer).name for layer in range(cfg.n_layers)]
        self.values, cache, self.logits = run_metric(
            model, tokens, metric, names, attention_mask=mask, kv_cache=self.kv
        )
        self.resid = [cache[Site(SiteKind.RESID_PRE, layer)] for layer in range(cfg.n_layers)]
        batch, n_pos = tokens.shape
        self.read_pos = (
            metric.read_positions(batch, n_pos, tokens.device) if isinstance(metric, PositionMetric) else None
        )

    def run(self, target: PatchTarget, layer: int, chunk: list[Patch], source: Tensor, p0: int) -> Tensor:
        """Metric values [len(chunk), batch] with each patch applied to its own stacked copy of the batch."""
        model, cfg = self.model, self.model.cfg
        n = len(chunk)
        b, n_pos = self.tokens.shape
        s = n_pos - p0
        resid = self.resid[layer][:, p0:].repeat(n, 1, 1)
        kv = self.kv.prefix(p0, n, from_layer=layer) if p0 > 0 else None
        suffix_mask = None if self.mask is None else self.mask[:, p0:].repeat(n, 1)
        ctx = model.context(torch.zeros(n * b, s, dtype=torch.long, device=resid.device), suffix_mask, kv)
        src = source.narrow(pos_dim(target), p0, source.shape[pos_dim(target)] - p0)

        def patch(act: Tensor, site: Site) -> Tensor:
            act = act.clone()
            for i, p in enumerate(chunk):
                sel = selection(target, None if p.pos is None else p.pos - p0, p.index)
                act[i * b : (i + 1) * b][sel] = src[sel]
            return act

        keep = None
        if self.read_pos is not None and (layer < cfg.n_layers - 1 or target not in _IN_FINISH):
            keep = (self.read_pos - p0).clamp(min=0).repeat(n)[:, None]
        with model.hooks([(site_of(target, layer), patch)]):
            if keep is None:
                out = model.run_blocks(resid, ctx, start=layer, kv_cache=kv)
            else:
                out = self._run_to_read_positions(resid, ctx, layer, kv, keep)
        return self._metric(out, n, p0, kept=keep is not None)

    def _run_to_read_positions(
        self, resid: Tensor, ctx: AttnContext, layer: int, kv: KVCache | None, keep: Tensor
    ) -> Tensor:
        """Blocks ``layer`` .. last, the last one past its attention only at the positions ``keep`` [rows k]
        the metric reads: [rows k d_model]."""
        model = self.model
        last = model.cfg.n_layers - 1
        resid = model.run_blocks(resid, ctx, start=layer, stop=last, kv_cache=kv)
        resid_pre, attn_out = model.blocks[last].attend(
            resid, ctx, kv.layers[last] if kv is not None else None
        )
        index = keep[:, :, None].expand(-1, -1, resid_pre.shape[-1])
        return model.blocks[last].finish(resid_pre.gather(1, index), attn_out.gather(1, index))

    def _metric(self, out: Tensor, n: int, p0: int, kept: bool) -> Tensor:
        b = self.tokens.shape[0]
        if self.read_pos is not None:
            assert isinstance(self.metric, PositionMetric)  # read positions come from a PositionMetric
            rel = self.read_pos - p0
            if kept:
                rows = out.view(n, b, -1)
            else:
                rows = out.view(n, b, out.shape[1], -1)[
                    :, torch.arange(b, device=out.device), rel.clamp(min=0)
                ]
            logits = self.model.unembed_resid(rows)
            vals = torch.stack([check_metric_output(self.metric.from_final(logits[i]), b) for i in range(n)])
            # a read position before the first recomputed one cannot see any patch: the base value holds
            return torch.where(rel >= 0, vals, self.values)
        logits = self.model.unembed_resid(out)
        if p0 > 0:
            assert self.logits is not None  # kept for every metric but a PositionMetric
            logits = torch.cat([self.logits[:, :p0].repeat(n, 1, 1), logits], dim=1)
        return torch.stack(
            [check_metric_output(self.metric(logits[i * b : (i + 1) * b]), b) for i in range(n)]
        )


def _chunks(
    patches: list[Patch], batch: int, n_pos: int, budget: int, reuse_prefix: bool
) -> list[tuple[list[Patch], int]]:
    """Group one layer's patches (sorted by position) into chunks of at most ``budget`` tokens."""
    out: list[tuple[list[Patch], int]] = []
    cur: list[Patch] = []
    p0 = 0
    for p in sorted(patches, key=lambda q: -1 if q.pos is None else q.pos):
        start = (p.pos or 0) if reuse_prefix else 0
        if cur and (len(cur) + 1) * batch * (n_pos - p0) > budget:
            out.append((cur, p0))
            cur = []
        if not cur:
            p0 = start
        cur.append(p)
    if cur:
        out.append((cur, p0))
    return out


@dataclass(frozen=True)
class PatchPlan:
    """What every patching function starts with (see `prepare_patches`)."""

    target: PatchTarget
    direction: Direction
    clean: Tensor
    """the checked clean tokens [batch pos]"""
    corrupted: Tensor
    """the checked corrupted tokens [batch pos]"""
    patches: list[Patch]
    """every patch, in the result's order"""
    dims: tuple[str, ...]
    """the result's dimensions, e.g. ('layer', 'pos')"""
    shape: tuple[int, ...]
    """the result's shape"""
    base: Tensor
    """the run patched into: the corrupted tokens when denoising, the clean ones when noising"""
    source: Tensor
    """the run patched from"""


def prepare_patches(
    model: Transformer,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    target: PatchTarget | str,
    direction: Direction | str,
    attention_mask: Tensor | None,
    **selection: Any,
) -> PatchPlan:
    """The parsed target and direction, the checked token pair, the planned patches (``selection``:
    by_position, layers, indices, positions) and which run is the base."""
    target, direction = parse_target(target), Direction(direction)
    clean, corrupted = check_pair(model, clean_tokens, corrupted_tokens, attention_mask)
    patches, dims, shape = plan_patches(model, target, clean.shape[1], **selection)
    base, source = (corrupted, clean) if direction is Direction.DENOISE else (clean, corrupted)
    return PatchPlan(target, direction, clean, corrupted, patches, dims, shape, base, source)


def activation_patch(
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
    config: PatchConfig = PatchConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> PatchResult:
    """Patch ``target`` at every layer (and position / head / neuron; see `interplab.analysis.targets`).

    ``metric(logits [batch pos d_vocab]) -> [batch]``; the result holds its batch mean after each patch.
    ``indices`` restricts heads or neurons, ``positions`` restricts (query) positions, ``layers`` layers.
    ``progress(done, total)`` is called after each chunk."""
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
    target, patches = plan.target, plan.patches
    layer_list = sorted({p.layer for p in patches})
    batch, n_pos = plan.clean.shape
    with torch.no_grad():
        src_values, source = source_activations(
            model, plan.source, metric, target, layer_list, attention_mask
        )
        base = _BaseRun(model, plan.base, attention_mask, metric)
        values: dict[Patch, Tensor] = {}
        for layer, group in groupby(patches, key=lambda p: p.layer):
            for chunk, p0 in _chunks(list(group), batch, n_pos, config.max_batch_tokens, config.reuse_prefix):
                for p, v in zip(chunk, base.run(target, layer, chunk, source[layer], p0), strict=True):
                    values[p] = v
                if progress is not None:
                    progress(len(values), len(patches))
    mean, per = as_values([values[p] for p in patches], plan.shape)
    clean_m, corr_m = (
        (src_values, base.values) if plan.direction is Direction.DENOISE else (base.values, src_values)
    )
    return PatchResult(
        values=mean,
        per_example=per,
        dims=plan.dims,
        target=target,
        direction=plan.direction,
        labels=result_labels(model, plan.dims, plan.clean, layers, indices, positions, target),
        method="activation",
        clean_metric=float(clean_m.mean()),
        corrupted_metric=float(corr_m.mean()),
    )


def activation_patch_loop(
    model: Transformer,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
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
    """The reference: one full forward pass with one hook per patch. Slow; `activation_patch` equals it."""
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
    target = plan.target
    b = plan.clean.shape[0]
    with torch.no_grad():
        names = {layer: site_of(target, layer).name for layer in sorted({p.layer for p in plan.patches})}
        src_logits, cache = model.run_with_cache(
            plan.source, list(names.values()), attention_mask=attention_mask
        )
        source = {layer: cache[name] for layer, name in names.items()}
        base_logits = model(plan.base, attention_mask=attention_mask)
        flat = []
        for p in plan.patches:
            sel = selection(target, p.pos, p.index)

            def hook(act: Tensor, site: Site, sel: tuple = sel, src: Tensor = source[p.layer]) -> Tensor:
                act = act.clone()
                act[sel] = src[sel]
                return act

            logits = model.run_with_hooks(
                plan.base, [(site_of(target, p.layer), hook)], attention_mask=attention_mask
            )
            flat.append(check_metric_output(metric(logits), b))
        src_v, base_v = (
            check_metric_output(metric(src_logits), b),
            check_metric_output(metric(base_logits), b),
        )
    mean, per = as_values(flat, plan.shape)
    clean_m, corr_m = (src_v, base_v) if plan.direction is Direction.DENOISE else (base_v, src_v)
    return PatchResult(
        values=mean,
        per_example=per,
        dims=plan.dims,
        target=target,
        direction=plan.direction,
        labels=result_labels(model, plan.dims, plan.clean, layers, indices, positions, target),
        method="activation",
        clean_metric=float(clean_m.mean()),
        corrupted_metric=float(corr_m.mean()),
    )
