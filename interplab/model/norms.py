"""The norms: LayerNorm and RMSNorm with TransformerLens' hook points (``hook_scale``, ``hook_normalized``), and
the identity for ``normalization="none"``. The fused kernel is the fast path; the step-by-step norm runs when a
hook may replace what it shows (chosen by `interplab.model.layers.need`)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.hooks.points import HookPoint
from interplab.model.config import ModelConfig, Norm, QKNorm
from interplab.model.layers import Need, need, value_of


class Normalization(nn.Module):
    """LayerNorm or RMSNorm: ``normalized * w (+ b)``, with TransformerLens' two hook points:
    ``hook_scale`` [batch pos 1], what the norm divides by, and ``hook_normalized`` [... d_model], the normalised
    vector ``x / scale`` (centred first for LayerNorm) *before* the weight and bias, computed in float32 as in
    TransformerLens."""

    def __init__(
        self,
        cfg: ModelConfig,
        scale: HookPoint | None,
        normalized: HookPoint | None,
        *,
        shape: tuple[int, ...] | None = None,
        kind: Norm | None = None,
    ) -> None:
        """``shape``: the trailing dimensions normalised together, the weight's shape (default (d_model,));
        q/k norms pass (d_head,) (per head) or (n_heads, d_head) (all heads at once) and ``kind`` RMSNorm."""
        super().__init__()
        self.kind = cfg.normalization if kind is None else kind
        self.eps = cfg.norm_eps
        shape = (cfg.d_model,) if shape is None else tuple(shape)
        self.dims = tuple(range(-len(shape), 0))
        """the dimensions the norm reduces over (the last one, or the last two for a full-width q/k norm)"""
        self.w = nn.Parameter(torch.ones(shape))
        self.weight_in_float32 = cfg.norm_weight_float32  # (x * w).to(dtype), not x.to(dtype) * w
        if self.kind is Norm.LAYERNORM:
            self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = scale
        self.hook_normalized = normalized

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The step-by-step `_hooked` norm is the reference; the fused kernel (`_norm`) is the fast path."""
        scale, normalized = self.hook_scale, self.hook_normalized
        wanted = need(scale, normalized)
        if wanted is Need.REPLACE:
            return self._hooked(x)
        if wanted is Need.GRAD:
            return value_of(self._norm(x)[0], self._hooked(x))
        out, inv_scale = self._norm(x)
        if wanted is Need.READ:  # report beside the fused kernel, compute as usual
            self._show(x, inv_scale)
        return out

    def _show(self, x: Tensor, inv_scale: Tensor) -> None:
        """Show the scale and the normalised vector to read hooks (float32, as TransformerLens reports)."""
        scale, normalized = self.hook_scale, self.hook_normalized
        reading_scale = scale is not None and scale.active
        reading_normalized = normalized is not None and normalized.active
        low_precision = inv_scale.dtype not in (torch.float32, torch.float64)
        if reading_normalized or low_precision:
            xf = self._centred(x)
            if low_precision:
                inv_scale = torch.rsqrt(xf.pow(2).mean(self.dims, keepdim=True) + self.eps)
        if reading_scale and scale is not None:
            scale(inv_scale.reciprocal())
        if reading_normalized and normalized is not None:
            normalized(xf * inv_scale)

    def divide_by_scale(self, x: Float[Tensor, "... d_model"], scale: Tensor) -> Float[Tensor, "... d_model"]:
        """``x`` centred (LayerNorm) and divided by a given ``scale`` (e.g. a cached ``hook_scale``), without
        the weight and bias: how the norm acts on components of the residual stream it normalised."""
        if self.kind is Norm.LAYERNORM:
            x = x - x.mean(-1, keepdim=True)
        return x / scale

    def apply_to_direction(self, d: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The norm's linear part applied to directions ``d``: centred (LayerNorm), times the weight (in
        float32); the scale (a positive factor) and the bias are left out."""
        if self.kind is Norm.LAYERNORM:
            d = d - d.mean(-1, keepdim=True)
        return d * self.w.detach().float()

    def normalize(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The norm without hooks."""
        return self._norm(x)[0]

    def _norm(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The output (weight and bias applied) and 1 / scale, where scale is what the norm divides by:
        sqrt(variance + eps) (LayerNorm) or sqrt(mean square + eps) (RMSNorm). The kernels compute both in one
        pass."""
        if self.kind is Norm.LAYERNORM:
            out, _, inv_scale = torch.native_layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
            return out, inv_scale
        return _rms_norm(x, self._weight(x), self.eps, self.dims, self.weight_in_float32)

    def _weight(self, x: Tensor) -> Tensor:
        """The weight for ``x``: a full-width key norm's [n_kv_heads d_head] weight is repeated per query head
        when the keys come one copy per query head (`HeadInputs` under grouped-query attention; the mean
        square over identical copies is the mean square over the originals)."""
        w: Tensor = self.w
        if w.dim() == 2 and x.shape[-2] != w.shape[0]:
            w = w.repeat_interleave(x.shape[-2] // w.shape[0], dim=0)
        return w

    def _centred(self, x: Tensor) -> Tensor:
        """``x`` in float32 (float64 kept), minus its mean over d_model for LayerNorm."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return xf - xf.mean(-1, keepdim=True) if self.kind is Norm.LAYERNORM else xf

    def _hooked(self, x: Tensor) -> Tensor:
        """Step by step, as TransformerLens: centre, ``scale`` (hooked), ``x / scale`` (hooked), then the
        weight and bias; a replaced scale or normalised vector is what the output is made of."""
        xf = self._centred(x)
        scale = (xf.pow(2).mean(self.dims, keepdim=True) + self.eps).sqrt()
        if self.hook_scale is not None:
            scale = self.hook_scale(scale)
        normalized = xf / scale
        if self.hook_normalized is not None:
            normalized = self.hook_normalized(normalized)
        if self.weight_in_float32:
            return (normalized * self._weight(x).to(normalized.dtype)).to(x.dtype)
        out = normalized.to(x.dtype) * self._weight(x)
        return out + self.b if self.kind is Norm.LAYERNORM else out


def _rms_norm(
    x: Tensor, w: Tensor, eps: float, dims: tuple[int, ...] = (-1,), weight_in_float32: bool = False
) -> tuple[Tensor, Tensor]:
    """RMSNorm over ``dims`` and the reciprocal of its scale, computed in float32 (float64 kept) and cast back
    to x's dtype before the weight (Llama) or after it (``weight_in_float32``: Gemma, OLMo-2, as Hugging Face
    does each)."""
    dtype = x.dtype
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    inv = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    if weight_in_float32:
        return (xf * inv * w.to(xf.dtype)).to(dtype), inv
    return (xf * inv).to(dtype) * w, inv


def make_norm(
    cfg: ModelConfig, scale: HookPoint | None = None, normalized: HookPoint | None = None
) -> Normalization | _NoNorm:
    """A norm with hook points (none for norms without a place in the hook vocabulary: post norms)."""
    if cfg.normalization is Norm.NONE:
        return _NoNorm(normalized)
    return Normalization(cfg, scale, normalized)


def make_qk_norm(cfg: ModelConfig, heads: int, scale: HookPoint, normalized: HookPoint) -> Normalization:
    """The RMSNorm of queries (``heads`` = n_heads) or keys (n_kv_heads) [batch pos heads d_head]: over each
    head's d_head (``qk_norm="head"``, weight [d_head]) or over all heads at once (``"full"``, weight
    [heads d_head]). ``hook_scale`` is [batch pos heads 1] or [batch pos 1 1]."""
    shape = (cfg.d_head,) if cfg.qk_norm is QKNorm.HEAD else (heads, cfg.d_head)
    return Normalization(cfg, scale, normalized, shape=shape, kind=Norm.RMSNORM)


def identity_norm() -> _NoNorm:
    """The identity in a norm's place, without hook points (the missing pre-norms of OLMo-2's blocks)."""
    return _NoNorm(None)


class _NoNorm(nn.Module):
    """No normalisation (``normalization="none"``): the identity, with the same public methods."""

    hook_scale = None

    def __init__(self, normalized: HookPoint | None) -> None:
        super().__init__()
        self.hook_normalized = normalized

    def forward(self, x: Tensor) -> Tensor:
        return x if self.hook_normalized is None else self.hook_normalized(x)

    def normalize(self, x: Tensor) -> Tensor:
        return x

    def divide_by_scale(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        return x

    def apply_to_direction(self, d: Tensor) -> Tensor:
        return d
