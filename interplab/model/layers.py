"""The pieces of a transformer block: norms, rotary embeddings, attention and MLP, with hook points.

Shapes use one vocabulary: batch pos d_model n_heads n_kv_heads d_head d_mlp. Per-head tensors
(scores, pattern, per-head results, split inputs) are built only when a hook asks for them; otherwise
attention runs through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interplab.hooks.points import HookPoint
from interplab.hooks.site import Site, SiteKind
from interplab.model.config import Activation, ModelConfig, Norm, Positional, RotaryStyle

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _hp(kind: SiteKind, layer: int | None) -> HookPoint:
    return HookPoint(Site(kind, layer))


class _ValueOf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, graph: Tensor) -> Tensor:  # type: ignore[override]
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, grad


def value_of(value: Tensor, graph: Tensor) -> Tensor:
    """``value`` in the forward pass (bit for bit), with the gradient of ``graph`` (the same quantity computed
    another way). Backward hooks need a tensor the fast path never builds (per-head results, attention
    patterns, split inputs, norm scales): the slow path carries the gradient, the forward stays the fast one."""
    return _ValueOf.apply(value.detach(), graph)


def replaced(point: HookPoint) -> bool:
    """Whether forward hooks may replace the activation (backward hooks alone leave the forward unchanged)."""
    return bool(point.fwd)


# ---------------------------------------------------------------------------------------------------
class Normalization(nn.Module):
    """LayerNorm or RMSNorm with ``hook_scale`` [batch pos 1] and ``hook_normalized`` (the output)."""

    def __init__(self, cfg: ModelConfig, scale: HookPoint | None, normalized: HookPoint | None) -> None:
        super().__init__()
        self.kind = cfg.normalization
        self.eps = cfg.norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        if self.kind is Norm.LAYERNORM:
            self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = scale
        self.hook_normalized = normalized

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if self.hook_scale is not None and replaced(self.hook_scale):
            out = self._by_hooked_scale(x)
        elif self.hook_scale is not None and self.hook_scale.intervened:  # backward hooks only
            out = value_of(self._norm(x)[0], self._by_hooked_scale(x))
        else:
            out, inv_scale = self._norm(x)
            if self.hook_scale is not None and self.hook_scale.active:  # only read: report, compute as usual
                self.hook_scale(inv_scale.reciprocal())
        return out if self.hook_normalized is None else self.hook_normalized(out)

    def normalize(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The norm without hooks."""
        return self._norm(x)[0]

    def _norm(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The normalised output and 1 / scale, where scale is what the norm divides by: sqrt(variance + eps)
        (LayerNorm) or sqrt(mean square + eps) (RMSNorm). The kernels compute both in one pass."""
        if self.kind is Norm.LAYERNORM:
            out, _, inv_scale = torch.native_layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
            return out, inv_scale
        return _rms_norm(x, self.w, self.eps)

    def _by_hooked_scale(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least, float64 kept
        if self.kind is Norm.LAYERNORM:
            xf = xf - xf.mean(-1, keepdim=True)
        scale = self.hook_scale((xf.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        out = (xf / scale).to(dtype) * self.w
        return out + self.b if self.kind is Norm.LAYERNORM else out


def _rms_norm(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm and the reciprocal of its scale."""
    dtype = x.dtype
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv).to(dtype) * w, inv


def make_norm(
    cfg: ModelConfig, scale: HookPoint | None = None, normalized: HookPoint | None = None
) -> nn.Module:
    """A norm with hook points (none for norms without a place in the hook vocabulary: post norms)."""
    if cfg.normalization is Norm.NONE:
        return _NoNorm(normalized)
    return Normalization(cfg, scale, normalized)


class _NoNorm(nn.Module):
    def __init__(self, normalized: HookPoint | None) -> None:
        super().__init__()
        self.hook_normalized = normalized

    def forward(self, x: Tensor) -> Tensor:
        return x if self.hook_normalized is None else self.hook_normalized(x)

    def normalize(self, x: Tensor) -> Tensor:
        return x


# ---------------------------------------------------------------------------------------------------
def rotary_tables(
    cfg: ModelConfig, positions: Int[Tensor, "batch pos"], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin tables [batch pos 1 rotary_dim] for the given absolute positions."""
    dim = cfg.rotary_dim
    assert dim is not None
    inv_freq = 1.0 / (
        cfg.rotary_base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq  # batch pos dim/2
    if cfg.rotary_style is RotaryStyle.NEOX:
        angles = torch.cat([angles, angles], dim=-1)
    else:
        angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos()[:, :, None, :].to(dtype), angles.sin()[:, :, None, :].to(dtype)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor, style: RotaryStyle
) -> Float[Tensor, "batch pos head d_head"]:
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    if style is RotaryStyle.NEOX:
        half = dim // 2
        rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    else:
        pairs = x_rot.unflatten(-1, (dim // 2, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    out = x_rot * cos + rotated * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


# ---------------------------------------------------------------------------------------------------
@dataclass
class AttnContext:
    """What every layer's attention needs to know about the batch: key validity and positions."""

    positions: Int[Tensor, "batch pos"]
    key_valid: Bool[Tensor, "batch key_pos"] | None  # None: every key is a real token
    rotary: tuple[Tensor, Tensor] | None = None
    past_len: int = 0
    memo: dict = field(default_factory=dict)  # masks built once per forward, shared by the layers

    def mask(self, q_len: int, window: int | None, causal: bool) -> Bool[Tensor, "batch 1 q k"] | None:
        """Boolean mask (True = may attend), or None when plain causal attention needs none (built once per
        window and shared by the layers)."""
        key = ("mask", q_len, window, causal)
        if key not in self.memo:
            self.memo[key] = self._mask(q_len, window, causal)
        return self.memo[key]

    def additive_mask(
        self, mask: Tensor | None, q_len: int, k_len: int, causal: bool, dtype: torch.dtype
    ) -> Float[Tensor, "batch_or_1 q k"] | None:
        """``mask`` (or plain causality when it is None) as 0 / -inf to add to the scores."""
        if mask is None and not causal:
            return None
        key = ("additive", id(mask), q_len, k_len, causal, dtype)
        if key not in self.memo:
            if mask is None:
                mask = torch.ones(q_len, k_len, dtype=torch.bool, device=self.positions.device).tril(
                    k_len - q_len
                )
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self.memo[key] = bias.reshape(-1, q_len, k_len)  # [batch, q, k] or [1, q, k]
        return self.memo[key]

    def _mask(self, q_len: int, window: int | None, causal: bool) -> Tensor | None:
        k_len = self.past_len + q_len
        if self.key_valid is None and window is None and (not causal or self.past_len == 0):
            return None
        device = self.positions.device
        q_idx = torch.arange(self.past_len, k_len, device=device)[:, None]
        k_idx = torch.arange(k_len, device=device)[None, :]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if causal:
            allowed = k_idx <= q_idx
        if window is not None:
            allowed = allowed & (q_idx - k_idx < window)
        allowed = allowed[None, None]
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, None, :]
            # a padding query would see no key at all: let it see itself so no row is empty
            allowed = allowed | (q_idx == k_idx)[None, None]
        return allowed


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, kv, d, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
        assert kv is not None and dh is not None
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_K = nn.Parameter(torch.empty(kv, d, dh))
        self.W_V = nn.Parameter(torch.empty(kv, d, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(h, dh), requires_grad=cfg.attn_bias)
        self.b_K = nn.Parameter(torch.zeros(kv, dh), requires_grad=cfg.attn_bias)
        self.b_V = nn.Parameter(torch.zeros(kv, dh), requires_grad=cfg.attn_bias)
        self.b_O = nn.Parameter(torch.zeros(d), requires_grad=cfg.attn_bias)
        if cfg.smear_keys:
            self.smear = nn.Parameter(torch.zeros(kv))
        kinds = [
            SiteKind.Q,
            SiteKind.K,
            SiteKind.V,
            SiteKind.ATTN_SCORES,
            SiteKind.PATTERN,
            SiteKind.Z,
            SiteKind.RESULT,
        ]
        if cfg.positional is Positional.ROTARY:
            kinds += [SiteKind.ROT_Q, SiteKind.ROT_K]
        for kind in kinds:
            setattr(self, "hook_" + kind.value.split(".hook_")[1], _hp(kind, layer))
        self._fused: tuple[tuple, Tensor, Tensor] | None = None

    # fused QKV weights, cached while the weights are unchanged and no gradient is needed
    def _qkv_weight(self) -> tuple[Tensor, Tensor]:
        params = (self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V)
        d = self.cfg.d_model
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if need_grad or not all(type(p) is nn.Parameter for p in params):
            # training, or parameters swapped in by torch.func: build afresh, differentiably
            w = torch.cat([t.permute(1, 0, 2).reshape(d, -1) for t in params[:3]], dim=1)
            return w, torch.cat([t.reshape(-1) for t in params[3:]])
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._fused is None or self._fused[0] != key:
            w = torch.cat([t.permute(1, 0, 2).reshape(d, -1) for t in params[:3]], dim=1)
            self._fused = (key, w, torch.cat([t.reshape(-1) for t in params[3:]]))
        return self._fused[1], self._fused[2]

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"] | None,
        ctx: AttnContext,
        split: tuple[Tensor, Tensor, Tensor] | None = None,
        cache: LayerKV | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``x`` is the normalised residual stream, or ``split`` holds per-head normalised inputs
        ([batch pos n_heads d_model] for Q, [batch pos n_kv_heads d_model] for K and V); given both, the
        values come from ``x`` and the gradient flows through ``split``."""
        cfg = self.cfg
        h, kv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        if x is not None:
            w, b = self._qkv_weight()
            qkv = torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:2], h + 2 * kv, dh)
            q, k, v = qkv.split([h, kv, kv], dim=2)
        if split is not None:
            per_head = [
                torch.einsum("bphd,hde->bphe", inp, W) + b
                for inp, W, b in zip(
                    split, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V), strict=True
                )
            ]
            # both given: the values of x's path, the gradient of the split inputs' (backward hooks on them)
            q, k, v = per_head if x is None else map(value_of, (q, k, v), per_head)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cfg.smear_keys:
            k = self._smear(k, ctx, cache)
        if ctx.rotary is not None:
            cos, sin = ctx.rotary
            q = self.hook_rot_q(apply_rotary(q, cos, sin, cfg.rotary_style))
            k = self.hook_rot_k(apply_rotary(k, cos, sin, cfg.rotary_style))
        if cache is not None:
            k, v = cache.extend(k, v)
        mask = ctx.mask(q.shape[1], cfg.window_for(self.layer), cfg.causal)
        scores, pattern = self.hook_attn_scores, self.hook_pattern
        if replaced(scores) or replaced(pattern) or cfg.attn_softcap is not None:
            z = self._explicit(q, k, v, mask, ctx)
        elif scores.intervened or pattern.intervened:  # backward hooks only: the fast path's values
            z = value_of(self._sdpa(q, k, v, mask, ctx), self._explicit(q, k, v, mask, ctx))
        elif scores.active or pattern.active:
            z = self._explicit(q, k, v, mask, ctx)
        else:
            z = self._sdpa(q, k, v, mask, ctx)
        z = self.hook_z(z)
        out = torch.addmm(self.b_O, z.reshape(-1, h * dh), self.W_O.reshape(h * dh, -1)).view(
            *z.shape[:2], -1
        )
        if self.hook_result.active:
            # every head's output in one batched matmul [head, batch*pos, d_model]; the hook sees a
            # [batch pos head d_model] view of it (no copy)
            zh = z.permute(2, 0, 1, 3).reshape(h, -1, dh)
            result = torch.bmm(zh, self.W_O).view(h, *z.shape[:2], -1).permute(1, 2, 0, 3)
            if replaced(self.hook_result):  # the heads' (possibly replaced) outputs make attn_out
                return self.hook_result(result).sum(dim=2) + self.b_O
            if self.hook_result.intervened:  # backward hooks only: the fused values, the per-head gradient
                return value_of(out, self.hook_result(result).sum(dim=2) + self.b_O)
            self.hook_result(result)  # only read: attn_out stays the exact fused computation
        return out

    def _smear(self, k: Tensor, ctx: AttnContext, cache: LayerKV | None) -> Tensor:
        gate = torch.sigmoid(self.smear)[:, None]  # n_kv_heads 1
        prev = (
            cache.last_raw_k
            if cache is not None and cache.last_raw_k is not None
            else torch.zeros_like(k[:, :1])
        )
        if cache is not None:
            cache.last_raw_k = k[:, -1:]
        shifted = torch.cat([prev, k[:, :-1]], dim=1)
        if ctx.key_valid is not None:
            # the first real token of a left-padded row has no previous key: do not mix in the padding's
            shifted = shifted * (ctx.positions > 0)[:, :, None, None].to(k.dtype)
        return gate * k + (1 - gate) * shifted

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, ctx: AttnContext) -> Tensor:
        g = self.cfg.n_groups
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kw = {}
        if g > 1:
            if _SDPA_GQA:
                kw["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        is_causal = mask is None and self.cfg.causal and q.shape[2] > 1
        z = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0 / self.cfg.attn_scale, **kw
        )
        return z.transpose(1, 2)

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, ctx: AttnContext) -> Tensor:
        cfg = self.cfg
        g = cfg.n_groups
        if g > 1:
            k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        b, q_len, h, e = q.shape
        k_len = k.shape[1]
        q3 = q.transpose(1, 2).reshape(b * h, q_len, e)
        k3 = k.permute(0, 2, 3, 1).reshape(b * h, e, k_len)
        bias = ctx.additive_mask(mask, q_len, k_len, cfg.causal, q.dtype)  # [1 or b*h, q, k]: 0 or -inf
        if cfg.attn_softcap is None:
            # scale and mask fused into the matmul: scores = bias + (q k^T) / attn_scale, one pass
            if bias is not None and bias.shape[0] != 1:
                bias = bias.view(b, 1, q_len, k_len).expand(b, h, q_len, k_len).reshape(b * h, q_len, k_len)
            if bias is None:
                scores = torch.bmm(q3, k3).div_(cfg.attn_scale)
            else:
                scores = torch.baddbmm(bias, q3, k3, alpha=1.0 / cfg.attn_scale)
            scores = scores.view(b, h, q_len, k_len)
        else:
            scores = torch.bmm(q3, k3).view(b, h, q_len, k_len) / cfg.attn_scale
            scores = cfg.attn_softcap * torch.tanh(scores / cfg.attn_softcap)
            if bias is not None:
                scores = scores + bias.view(-1, 1, q_len, k_len)
        scores = self.hook_attn_scores(scores)
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # float64 models stay float64
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(v.dtype))
        return torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2)


@dataclass
class LayerKV:
    """Keys and values of earlier positions for one layer (generation)."""

    k: Tensor | None = None
    v: Tensor | None = None
    last_raw_k: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


# ---------------------------------------------------------------------------------------------------
_ACTIVATIONS = {
    Activation.GELU: F.gelu,
    Activation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
    Activation.RELU: F.relu,
    Activation.SILU: F.silu,
    Activation.GELU_QUICK: lambda x: x * torch.sigmoid(1.702 * x),
}


class MLP(nn.Module):
    """``act(x W_in + b_in) W_out + b_out``, or gated: ``(act(x W_gate) * (x W_in + b_in)) W_out + b_out``."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp
        assert m is not None
        self.gated = cfg.gated_mlp
        self.act = _ACTIVATIONS[cfg.act_fn]
        self.W_in = nn.Parameter(torch.empty(d, m))
        self.b_in = nn.Parameter(torch.zeros(m), requires_grad=cfg.mlp_bias)
        if self.gated:
            self.W_gate = nn.Parameter(torch.empty(d, m))
        self.W_out = nn.Parameter(torch.empty(m, d))
        self.b_out = nn.Parameter(torch.zeros(d), requires_grad=cfg.mlp_bias)
        self.hook_pre = _hp(SiteKind.MLP_PRE, layer)
        if self.gated:
            self.hook_pre_linear = _hp(SiteKind.MLP_PRE_LINEAR, layer)
        self.hook_post = _hp(SiteKind.MLP_POST, layer)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        flat = x.reshape(-1, x.shape[-1])
        if self.gated:
            pre = self.hook_pre((flat @ self.W_gate).view(*x.shape[:-1], -1))
            linear = self.hook_pre_linear(torch.addmm(self.b_in, flat, self.W_in).view(*x.shape[:-1], -1))
            post = self.hook_post(self.act(pre) * linear)
        else:
            pre = self.hook_pre(torch.addmm(self.b_in, flat, self.W_in).view(*x.shape[:-1], -1))
            post = self.hook_post(self.act(pre))
        return torch.addmm(self.b_out, post.reshape(-1, post.shape[-1]), self.W_out).view(*x.shape[:-1], -1)


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2 style: normal(0, init_range); output projections scaled by 1/sqrt(2 n_layers)."""
    out_std = cfg.init_range / math.sqrt(2 * cfg.n_layers)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("W_"):
            nn.init.normal_(p, std=out_std if leaf in ("W_O", "W_out") else cfg.init_range)
