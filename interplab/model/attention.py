"""Attention: rotary embeddings, the batch's mask and positions (`AttnContext`), and multi-head attention
(`Attention`) with its fast paths behind one seam each (fused QKV, SDPA, one output matmul), chosen by
`interplab.model.layers.need` from what the hooks on its points ask.

Shapes: batch pos d_model n_heads n_kv_heads d_head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interplab.hooks.points import HookPoint
from interplab.hooks.site import SiteKind
from interplab.hooks.transforms import is_vmapped
from interplab.model.config import ModelConfig, Positional, QKNorm, RotaryStyle
from interplab.model.kv_cache import LayerKV
from interplab.model.layers import Need, _hp, need, value_of
from interplab.model.norms import Normalization, make_qk_norm
from interplab.model.rope import depends_on_length, inverse_frequencies

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def rotary_tables(
    cfg: ModelConfig, positions: Int[Tensor, "batch pos"], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin tables [batch pos 1 rotary_dim] for the given absolute positions, under the config's rope
    scaling (`interplab.model.rope`; the length-dependent ones read the largest position here + 1, so pass a
    forward's positions whole, a key/value cache's new ones counted from its past)."""
    dim = cfg.rotary_dim
    assert dim is not None
    scaling = cfg.rope_scaling
    seq_len = positions.max() + 1 if depends_on_length(scaling) and positions.numel() else None
    inv_freq, attention_factor = inverse_frequencies(
        scaling, base=cfg.rotary_base, dim=dim, seq_len=seq_len, device=positions.device
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq  # batch pos dim/2
    if cfg.rotary_style is RotaryStyle.NEOX:
        angles = torch.cat([angles, angles], dim=-1)
    else:
        angles = angles.repeat_interleave(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:  # yarn, longrope: as Hugging Face, on cos and sin (the scores get its square)
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype)


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
    out = (x_rot * cos + rotated * sin).to(x.dtype)  # float32 tables (`rotary_float32`): rotated in float32
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


# ---------------------------------------------------------------------------------------------------
@dataclass
class AttnContext:
    """What every layer's attention needs to know about the batch: key validity and positions."""

    positions: Int[Tensor, "batch pos"]
    key_valid: Bool[Tensor, "batch key_pos"] | None  # None: every key is a real token
    rotary: tuple[Tensor, Tensor] | None = None
    layer_rotary: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """tables of layers whose rotary base is their own (``ModelConfig.rotary_bases``), by layer"""
    past_len: int = 0
    memo: dict = field(default_factory=dict)  # masks built once per forward, shared by the layers

    def to(self, device: torch.device) -> AttnContext:
        """This context on ``device`` (for a block on another device of a split model); the masks built
        so far are not carried over, each device builds its own."""

        def move(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.to(device)
            if isinstance(v, (tuple, list)):
                return type(v)(move(x) for x in v)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v

        return replace(
            self, **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "memo"}, memo={}
        )

    def rotary_for(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """cos and sin for a layer: its own tables if it has them, else the model's."""
        return self.layer_rotary.get(layer, self.rotary) if self.layer_rotary else self.rotary

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
            # a query that would see no key at all (a left pad under causal attention) sees itself, so no row
            # is empty; every other query sees the real keys only, a right pad included (as TransformerLens and
            # rust_circuit: its output is what a head reading it under another input's longer mask gets)
            allowed = allowed | ((q_idx == k_idx)[None, None] & ~allowed.any(-1, keepdim=True))
        return allowed


class HeadInputs(NamedTuple):
    """Per-head normalised inputs of attention: what each query head's Q and each key/value head's K and V
    read (``hook_q_input`` etc., normalised). The model builds them only when a hook may rewrite them.

    Under grouped-query attention ``k`` and ``v`` may also hold one copy per *query* head (n_heads, not
    n_kv_heads): each query head then attends with keys and values made from its own copy, through its group's
    shared weights (what the edge engine needs to patch one head's key input without touching the others of
    its group; `Attention.project` tells the two apart by the shape)."""

    q: Float[Tensor, "batch pos n_heads d_model"]
    k: Float[Tensor, "batch pos n_kv_heads_or_n_heads d_model"]
    v: Float[Tensor, "batch pos n_kv_heads_or_n_heads d_model"]


class FusedQKV:
    """``W_Q``, ``W_K``, ``W_V`` (and their biases) concatenated into one [d_model, (n_heads + 2 n_kv_heads)
    d_head] matrix, so the three projections are one matmul.

    Built afresh at every call by default: a weight written through ``.data`` (``W_Q.data[0] = 0``, the usual
    way to ablate a weight) or by a fused optimiser kernel bumps no version counter, so a concatenation kept
    between calls could not tell the edited weights from the old ones and would silently answer for the old
    model. Only inside `keep_fused_weights` (generation, rollouts: many short forwards of weights promised
    unchanged) is it kept between calls, keyed on each parameter's storage pointer, version counter, dtype and
    device, and dropped on leaving. When a gradient is needed, or the parameters are not plain
    ``nn.Parameter``s (swapped in by ``torch.func.functional_call``), it is always built afresh, differentiably."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._weights: tuple[Tensor, Tensor] | None = None
        self.keep = 0
        """how many `keep_fused_weights` scopes are open on this attention (0: build at every call)"""

    def weights(self, attn: Attention) -> tuple[Tensor, Tensor]:
        """(W [d_model, (h + 2 kv) d_head], b [(h + 2 kv) d_head]) for ``attn``'s current parameters."""
        params = (attn.W_Q, attn.W_K, attn.W_V, attn.b_Q, attn.b_K, attn.b_V)
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if not self.keep or need_grad or not all(type(p) is nn.Parameter for p in params):
            return self._concat(params, attn.cfg.d_model)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._weights is None or self._key != key:
            self._key, self._weights = key, self._concat(params, attn.cfg.d_model)
        return self._weights

    def drop(self) -> None:
        self._key = self._weights = None

    @staticmethod
    def _concat(params: tuple[Tensor, ...], d_model: int) -> tuple[Tensor, Tensor]:
        w = torch.cat([t.permute(1, 0, 2).reshape(d_model, -1) for t in params[:3]], dim=1)
        return w, torch.cat([t.reshape(-1) for t in params[3:]])


@contextmanager
def keep_fused_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Within this scope the weights of ``module``'s attention layers are promised unchanged (a weight edit
    inside must go through an in-place op on the parameter, which bumps its version, never through ``.data``),
    so each keeps its fused QKV matrix between forwards instead of concatenating it per call: what makes many
    short forwards (one token per step of `interplab.model.generate.generate`, a rollout) cheap. Leaving drops
    what was kept. Scopes nest.

    >>> from interplab.model import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=11, n_ctx=8))
    >>> with keep_fused_weights(model), torch.no_grad():
    ...     logits = model(torch.tensor([[1, 2, 3]]))
    """
    fused = [m.fused_qkv for m in module.modules() if isinstance(m, Attention)]
    for f in fused:
        f.keep += 1
    try:
        yield module
    finally:
        for f in fused:
            f.keep -= 1
            if not f.keep:
                f.drop()


class Attention(nn.Module):
    """Multi-head attention of the normalised residual stream ``x``, per head h:

        q_h = x W_Q[h] + b_Q[h]      k_h = x W_K[h] + b_K[h]      v_h = x W_V[h] + b_V[h]
        (q/k norms: q = q_norm(q), k = k_norm(k), RMSNorm per head or over all heads, ``attn.q_norm``)
        (rotary: q_h, k_h rotated by position; GQA/MQA: a group of query heads shares one k_h, v_h)
        z_h = softmax(q_h k_h^T / attn_scale + mask) v_h
        attn_out = sum_h z_h W_O[h] + b_O

    `forward` reads as that sequence. Each fast path sits behind one seam that picks it from what the hooks
    ask (`need`): `project` (one fused QKV matmul, or per-head projections of `HeadInputs`), `_attend`
    (``scaled_dot_product_attention``, or the explicit scores and pattern) and `output` (one matmul over all
    heads, or the per-head results ``hook_result`` summed)."""

    # hook points, made in __init__ (hook_rot_q, hook_rot_k: rotary models only)
    hook_q: HookPoint
    hook_k: HookPoint
    hook_v: HookPoint
    hook_rot_q: HookPoint
    hook_rot_k: HookPoint
    hook_attn_scores: HookPoint
    hook_pattern: HookPoint
    hook_z: HookPoint
    hook_result: HookPoint
    q_norm: Normalization  # qk_norm models only, with hook_scale and hook_normalized
    k_norm: Normalization

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
        if cfg.qk_norm is not QKNorm.NONE:
            K = SiteKind
            self.q_norm = make_qk_norm(cfg, h, _hp(K.Q_NORM_SCALE, layer), _hp(K.Q_NORM_NORMALIZED, layer))
            self.k_norm = make_qk_norm(cfg, kv, _hp(K.K_NORM_SCALE, layer), _hp(K.K_NORM_NORMALIZED, layer))
        self.fused_qkv = FusedQKV()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"] | HeadInputs,
        ctx: AttnContext,
        cache: LayerKV | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``attn_out`` for the normalised residual stream ``x`` (every head reads it) or for per-head inputs."""
        q, k, v = self.project(x)
        return self.output(self.attend(q, k, v, ctx, cache))

    def project(self, x: Float[Tensor, "batch pos d_model"] | HeadInputs) -> tuple[Tensor, Tensor, Tensor]:
        """q [batch pos n_heads d_head], k and v [batch pos n_kv_heads d_head]: one matmul with the fused
        weights for a shared input, a per-head projection for `HeadInputs` (k and v [batch pos n_heads d_head]
        when they hold one copy per query head: each copy through its group's weights)."""
        if isinstance(x, HeadInputs):
            weights: tuple[Tensor, ...] = (self.W_Q, self.W_K, self.W_V)
            biases: tuple[Tensor, ...] = (self.b_Q, self.b_K, self.b_V)
            if self.cfg.n_groups > 1 and x.k.shape[2] == self.cfg.n_heads:
                g = self.cfg.n_groups
                weights = (self.W_Q, self.W_K.repeat_interleave(g, 0), self.W_V.repeat_interleave(g, 0))
                biases = (self.b_Q, self.b_K.repeat_interleave(g, 0), self.b_V.repeat_interleave(g, 0))
            q, k, v = (
                torch.einsum("bphd,hde->bphe", inp, W) + b
                for inp, W, b in zip(x, weights, biases, strict=True)
            )
            return q, k, v
        h, kv = self.cfg.n_heads, self.cfg.n_kv_heads
        w, b = self.fused_qkv.weights(self)
        qkv = torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:2], h + 2 * kv, self.cfg.d_head)
        q, k, v = qkv.split([h, kv, kv], dim=2)
        return q, k, v

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, cache: LayerKV | None = None
    ) -> Float[Tensor, "batch pos n_heads d_head"]:
        """z (after ``hook_z``) from the projections: hooks on q, k, v; the q/k norms; key smearing; rotary
        (the layer's own tables); the key/value cache; then softmax(q k^T / attn_scale + mask) v."""
        cfg = self.cfg
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cfg.qk_norm is not QKNorm.NONE:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.smear_keys:
            k = self._smear(k, ctx, cache)
        rotary = ctx.rotary_for(self.layer)
        if rotary is not None:
            cos, sin = rotary
            q = self.hook_rot_q(apply_rotary(q, cos, sin, cfg.rotary_style))
            k = self.hook_rot_k(apply_rotary(k, cos, sin, cfg.rotary_style))
        if cache is not None:
            k, v = cache.extend(k, v)
        return self.hook_z(self._attend(q, k, v, ctx))

    def head_results(self, x: HeadInputs, ctx: AttnContext) -> Float[Tensor, "batch pos n_heads d_model"]:
        """Each head's output ``z_h W_O[h]`` (no ``b_O``) for per-head inputs: what ``hook_result`` shows,
        without running it (hooks on q, k, v, the pattern and z do run; with one key/value input per query
        head, ``hook_k`` and ``hook_v`` see one per query head too)."""
        return self._head_results(self.attend(*self.project(x), ctx))

    # ---- the seams -------------------------------------------------------------------------------
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        """``softmax(q k^T / attn_scale + mask) v`` per head. ``scaled_dot_product_attention`` computes it in
        one kernel but never builds the scores or the pattern: the explicit computation (`_explicit`) runs when
        a hook reads or may replace them, always under soft-capped scores (which SDPA cannot apply) and under
        ``torch.func.vmap`` (SDPA has no batching rule on CPU: vmap would loop over the batch); under backward
        hooks alone the forward keeps SDPA's values and the gradient flows through the explicit path."""
        mask = ctx.mask(q.shape[1], self.cfg.window_for(self.layer), self.cfg.causal)
        wanted = need(self.hook_attn_scores, self.hook_pattern)
        if self.cfg.attn_softcap is None and not is_vmapped(q):
            if wanted is Need.NOTHING:
                return self._sdpa(q, k, v, mask)
            if wanted is Need.GRAD:
                return value_of(self._sdpa(q, k, v, mask), self._explicit(q, k, v, mask, ctx))
        return self._explicit(q, k, v, mask, ctx)

    def output(self, z: Tensor) -> Float[Tensor, "batch pos d_model"]:
        """``attn_out = sum_h z_h W_O[h] + b_O``: one matmul over all heads, unless a hook asks for the per-head
        results (read: shown beside it; replaceable: they are what attn_out is made of; backward hooks only:
        the matmul's values, the per-head gradient)."""
        h, dh = self.cfg.n_heads, self.cfg.d_head
        wanted = need(self.hook_result)
        if wanted is Need.REPLACE:
            return self.hook_result(self._head_results(z)).sum(dim=2) + self.b_O
        out = torch.addmm(self.b_O, z.reshape(-1, h * dh), self.W_O.reshape(h * dh, -1)).view(
            *z.shape[:2], -1
        )
        if wanted is Need.GRAD:
            return value_of(out, self.hook_result(self._head_results(z)).sum(dim=2) + self.b_O)
        if wanted is Need.READ:
            self.hook_result(self._head_results(z))
        return out

    def _head_results(self, z: Tensor) -> Float[Tensor, "batch pos n_heads d_model"]:
        """Every head's output in one batched matmul [head, batch*pos, d_model], as a [batch pos head d_model]
        view (no copy)."""
        h, dh = self.cfg.n_heads, self.cfg.d_head
        zh = z.permute(2, 0, 1, 3).reshape(h, -1, dh)
        return torch.bmm(zh, self.W_O).view(h, *z.shape[:2], -1).permute(1, 2, 0, 3)

    # ---- the two attention computations and key smearing ------------------------------------------
    def _smear(self, k: Tensor, ctx: AttnContext, cache: LayerKV | None) -> Tensor:
        """``gate * k + (1 - gate) * k of the previous position`` per key/value head (raw keys, before rotary)."""
        gate = torch.sigmoid(self.smear)[:, None]  # n_kv_heads 1
        if k.shape[2] != gate.shape[0]:  # one key per query head (`HeadInputs`): each uses its group's gate
            gate = gate.repeat_interleave(k.shape[2] // gate.shape[0], dim=0)
        prev = (
            cache.raw_k[:, -1:]
            if cache is not None and cache.raw_k is not None
            else torch.zeros_like(k[:, :1])
        )
        if cache is not None:
            cache.raw_k = k if cache.raw_k is None else torch.cat([cache.raw_k, k], dim=1)
        shifted = torch.cat([prev, k[:, :-1]], dim=1)
        if ctx.key_valid is not None:
            # the first real token of a left-padded row has no previous key: do not mix in the padding's
            shifted = shifted * (ctx.positions > 0)[:, :, None, None].to(k.dtype)
        return gate * k + (1 - gate) * shifted

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The same z from ``scaled_dot_product_attention`` (GQA natively where torch supports it)."""
        g = q.shape[2] // k.shape[2]  # query heads per key (1 when k holds one copy per query head)
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
        """scores = q k^T / attn_scale (soft-capped) + mask -> ``hook_attn_scores``; pattern = softmax(scores)
        -> ``hook_pattern``; z = pattern v."""
        cfg = self.cfg
        g = q.shape[2] // k.shape[2]  # query heads per key (1 when k holds one copy per query head)
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
            if q.dtype in (torch.bfloat16, torch.float16):
                # in half precision as transformers' eager attention rounds: q k^T, then times the scale
                scores = torch.bmm(q3, k3).mul_(1.0 / cfg.attn_scale)
                if bias is not None:
                    scores = scores.add_(bias)
            elif bias is None:
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
