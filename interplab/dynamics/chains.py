"""The next-token loss of every SGLD chain of an interplab `Transformer` in one chain-batched forward.

`estimate_llc` steps C chains, each with its own copy of the weights. The generic path calls the model once
per chain (or under `torch.func.vmap`); for the common small transformers that is mostly per-operation
overhead, the model's own matmuls being a few hundred MFLOP. Here the chains' weights stay stacked along a
leading chain axis ``[C, ...]`` and one forward computes every chain's loss with batched matmuls over the
chains, so each operation runs once per step, not once per chain, on C times the data:

- each norm's weight and bias are folded into the matmul that reads it (``(x_hat w + b) W = x_hat (w W) + b
  W``), so a norm is one pass over the activations;
- the Q, K and V projections are one matmul whose output is laid out head-major (``[chain * batch * head,
  pos, d_head]``) by the rotary embedding's own pass: rotary is a signed permutation of each head's vector,
  so the rotated query is ``q cos + swap(q) (sign sin)``, one `torch.autograd.Function` (`_Rotary`) with a
  few-pass forward and backward (no negation and its backward, and not the two extra matmul column
  blocks ``q M``, ``k M`` of an earlier version, which cost more than they saved);
- key smearing runs on the raw keys, as the model does;
- attention is explicit (`_CausalAttention`: scores, softmax, pattern times values as batched matmuls over
  ``[chain * batch * head, pos, pos]``, the backward written out: one autograd node), faster than
  `scaled_dot_product_attention`'s CPU flash kernels at the head dimensions of the models sampled here.

Under `torch.compile` (``estimate_llc(..., compile=True)``) the same function runs with plain operations in
place of the two autograd Functions, for the compiler to fuse.

The same function as the model's (`Transformer.forward` then `interplab.dynamics.llc.lm_loss`), to float
rounding: `tests/dynamics/test_chains.py` checks losses and gradients against the model, and whole SGLD runs
against the generic path. `supports` says which models it covers (the others take the generic path).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from interplab.model.attention import apply_rotary
from interplab.model.config import Norm, Positional, QKNorm, RotaryStyle
from interplab.model.transformer import Transformer


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the chain-batched path (None: it can)."""
    if type(model) is not Transformer:
        return "not an interplab Transformer"
    cfg = model.cfg
    checks = {
        "a float32 model": all(p.dtype == torch.float32 for p in model.parameters()),
        "causal attention": cfg.causal,
        "no sliding window": cfg.sliding_window is None,
        "no soft-capping": cfg.attn_softcap is None and cfg.logit_softcap is None,
        "no q/k norms": cfg.qk_norm is QKNorm.NONE,
        "no grouped-query attention": cfg.n_kv_heads == cfg.n_heads,
        "pre-norms only": cfg.pre_norms and not cfg.post_norms,
        "LayerNorm or no norm": cfg.normalization in (Norm.LAYERNORM, Norm.NONE),
        "no embedding scale": cfg.embed_scale is None,
        "sequential blocks": not cfg.parallel_attn_mlp,
        "an MLP without a gate": cfg.attn_only or not cfg.gated_mlp,
        "one rotary table": cfg.positional is not Positional.ROTARY
        or (cfg.rope_scaling is None and not cfg.per_layer_rotary),
        "no hooks": not model.hook_registry.any_active,
    }
    missing = [what for what, ok in checks.items() if not ok]
    return None if not missing else "needs " + ", ".join(missing)


class ChainLoss:
    """``loss(params, tokens) -> [C]``: every chain's mean next-token cross-entropy, for ``params`` a mapping
    from parameter name to the chains' stacked values ``[C, *shape]`` (any parameter missing from it is the
    model's own, shared by the chains) and ``tokens`` ``[C, batch, pos]`` (each chain its own batch)."""

    def __init__(self, model: Transformer) -> None:
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"ChainLoss {why}")
        self.model = model
        self.cfg = model.cfg
        # the model's own tensors, parameters and buffers (a frozen bias may be either)
        self.own = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
        cfg = self.cfg
        self.rotation: tuple[Tensor, Tensor] | None = None
        if cfg.positional is Positional.ROTARY:
            e, r = cfg.d_head, cfg.rotary_dim
            eye = torch.eye(r, device=self.own["embed.W_E"].device)
            ones = torch.ones(1, 1, 1, r, device=eye.device)
            # rotate(x) = x_rot cos + rotated sin: with cos = 0 and sin = 1 it is `rotated`, a linear map x M of
            # the head's vector, a signed permutation: rotated_j = sign_j x_perm_j (sign 0 past rotary_dim)
            m = apply_rotary(eye[None, :, None, :], ones * 0, ones, cfg.rotary_style)[0, :, 0, :]
            perm, sign = torch.arange(e, device=eye.device), torch.zeros(e, device=eye.device)
            perm[:r] = m.abs().argmax(0)
            sign[:r] = m[perm[:r], torch.arange(r)]
            self.swap = partial(_swap, style=cfg.rotary_style, dim=r)
            if not torch.equal(
                self.swap(torch.arange(e, device=eye.device)), perm
            ):  # an involution, by slices
                raise AssertionError(f"rotary {cfg.rotary_style} is not the pair swap `_swap` assumes")
            self.rotation = (perm, sign)
        self._cache: dict[tuple[str, int], tuple[Tensor, ...]] = {}

    def _tables(self, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """`_Rotary`'s tables [pos, d_head], kept per length: cos, sign * sin (1 and 0 on the dimensions rotary
        leaves alone), and the latter swapped (``(sign sin)[perm]``, for the backward)."""
        assert self.rotation is not None
        key = ("rotary", pos)
        if key not in self._cache:
            cos, sin = self.model._rotary_range(0, pos, self.own["embed.W_E"].device)
            cos, sin = cos[0, :, 0, :], sin[0, :, 0, :]
            e, r = self.cfg.d_head, self.cfg.rotary_dim
            if r < e:
                cos = torch.cat([cos, cos.new_ones(pos, e - r)], 1)
                sin = torch.cat([sin, sin.new_zeros(pos, e - r)], 1)
            perm, sign = self.rotation
            signed = sin * sign
            self._cache[key] = (cos.contiguous(), signed.contiguous(), signed[:, perm].contiguous())
        return self._cache[key]  # type: ignore[return-value]

    def _mask(self, pos: int, device: torch.device) -> Tensor:
        """The causal mask [pos, pos]: 0 on and below the diagonal, -inf above, kept per length."""
        key = ("mask", pos)
        if key not in self._cache:
            self._cache[key] = (torch.full((pos, pos), -math.inf, device=device).triu(1),)
        return self._cache[key][0]

    def __call__(self, params: Mapping[str, Tensor], tokens: Tensor) -> Tensor:
        cfg = self.cfg
        C, B, P = tokens.shape
        H, E, D = cfg.n_heads, cfg.d_head, cfg.d_model

        def get(name: str) -> Tensor:
            v = params.get(name)
            return self.own[name].expand(C, *self.own[name].shape) if v is None else v

        W_E = get("embed.W_E")  # C V D
        V = W_E.shape[1]
        offsets = (torch.arange(C, device=tokens.device) * V)[:, None, None]
        resid = F.embedding(tokens + offsets, W_E.reshape(C * V, D)).view(C, B * P, D)
        if cfg.positional is Positional.LEARNED:
            resid = (resid.view(C, B, P, D) + get("pos_embed.W_pos")[:, None, :P]).view(C, B * P, D)
        rotary = self._tables(P) if self.rotation is not None else None
        mask = self._mask(P, tokens.device)
        for layer in range(cfg.n_layers):
            pre = f"blocks.{layer}."
            x, w, b = self._norm(resid, pre + "ln1", get)
            Wcat = torch.stack(
                [get(pre + "attn." + n).permute(0, 2, 1, 3) for n in ("W_Q", "W_K", "W_V")], 2
            ).reshape(C, D, 3 * H * E)  # C D (3 H E): columns [q k v]
            bcat = torch.stack([get(pre + "attn." + n) for n in ("b_Q", "b_K", "b_V")], 1).reshape(C, 1, -1)
            if w is not None:
                bcat = bcat + (b[:, None] @ Wcat if b is not None else 0)
                Wcat = w.unsqueeze(-1) * Wcat
            # [2 (q k), C B, H, P, E] and [C B, H, P, E]: head-major for the attention's batched matmuls
            qkv = torch.baddbmm(bcat, x, Wcat).view(C * B, P, 3, H, E).permute(2, 0, 3, 1, 4)
            qk, v = qkv[:2], qkv[2].reshape(C * B * H, P, E)
            if cfg.smear_keys:  # the keys only (raw, before rotary, as the model does)
                gate = torch.sigmoid(get(pre + "attn.smear"))[:, None, :, None, None]  # C 1 H 1 1
                k = qk[1].view(C, B, H, P, E)
                k = gate * k + (1 - gate) * F.pad(k[:, :, :, :-1], (0, 0, 1, 0))
                qk = torch.stack([qk[0], k.view(C * B, H, P, E)])
            if rotary is not None:
                qk = _rotary(qk, *rotary, self.swap)  # contiguous
            else:
                qk = qk.contiguous()
            q, k = qk.view(2, C * B * H, P, E)
            z = _attention(q, k, v, mask, 1 / cfg.attn_scale)  # (C B H) P E
            z = z.view(C, B, H, P, E).transpose(2, 3).reshape(C, B * P, H * E)
            W_O = get(pre + "attn.W_O").reshape(C, H * E, D)
            resid = resid + torch.baddbmm(get(pre + "attn.b_O")[:, None], z, W_O)
            if not cfg.attn_only:
                x, w, b = self._norm(resid, pre + "ln2", get)
                W_in, b_in = get(pre + "mlp.W_in"), get(pre + "mlp.b_in")[:, None]
                if w is not None:
                    b_in = b_in + (b[:, None] @ W_in if b is not None else 0)
                    W_in = w.unsqueeze(-1) * W_in
                hidden = self.model.blocks[layer].mlp.act(torch.baddbmm(b_in, x, W_in))
                resid = resid + torch.baddbmm(get(pre + "mlp.b_out")[:, None], hidden, get(pre + "mlp.W_out"))
        x, w, b = self._norm(resid, "ln_final", get)
        W_U = get("embed.W_E").transpose(1, 2) if cfg.tie_embeddings else get("unembed.W_U")
        b_U = get("unembed.b_U")[:, None]
        if w is not None:
            b_U = b_U + (b[:, None] @ W_U if b is not None else 0)
            W_U = w.unsqueeze(-1) * W_U
        logits = torch.baddbmm(b_U, x, W_U)  # C BP V
        # the next token of every position; the last predicts nothing (ignored: no slice and copy of logits)
        targets = F.pad(tokens[:, :, 1:], (0, 1), value=-100)
        nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return nll.view(C, -1).sum(1) / (B * (P - 1))

    def _norm(
        self, x: Tensor, name: str, get: Callable[[str], Tensor]
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(x_hat, w, b)``: the normalised input, and the weight and bias [C D] the next matmul folds in
        (None without a norm)."""
        if self.cfg.normalization is Norm.NONE:
            return x, None, None
        return F.layer_norm(x, (x.shape[-1],), eps=self.cfg.norm_eps), get(name + ".w"), get(name + ".b")


def _swap(x: Tensor, style: RotaryStyle, dim: int) -> Tensor:
    """The permutation of rotary embeddings on the last axis, by slices (an index_select is ~10x slower): the
    halves of the first ``dim`` entries swapped (NeoX) or every pair of them (GPT-J); the rest left in place.
    Its own inverse."""
    parts = [x[..., dim:]] if dim < x.shape[-1] else []
    if style is RotaryStyle.NEOX:
        return torch.cat([x[..., dim // 2 : dim], x[..., : dim // 2], *parts], -1)
    pairs = torch.stack([x[..., 1:dim:2], x[..., 0:dim:2]], -1).flatten(-2)
    return torch.cat([pairs, *parts], -1) if parts else pairs


class _Rotary(torch.autograd.Function):
    """``x cos + swap(x) sin`` over the last axis (rotary embeddings: `_swap` a permutation, the signs in
    ``sin``), made contiguous; backward ``g cos + swap(g) swap(sin)`` (``swap`` is its own inverse): a few
    passes each way, not the model's slices, negation and concatenations and their backward."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, cos: Tensor, sin: Tensor, sin_swapped: Tensor, swap: Callable[[Tensor], Tensor]
    ) -> Tensor:
        ctx.save_for_backward(cos, sin_swapped)
        ctx.swap = swap
        out = torch.mul(x, cos, out=x.new_empty(x.shape))  # contiguous whatever x's strides
        return out.addcmul_(swap(x), sin)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin_swapped = ctx.saved_tensors
        return torch.addcmul(g * cos, ctx.swap(g), sin_swapped), *[None] * 4


class _CausalAttention(torch.autograd.Function):
    """Causal softmax attention ``softmax(scale q k^T + mask) v`` for ``q, k, v`` ``[batch, pos, d_head]``
    as three batched matmuls, the pattern kept for the backward (four batched matmuls and the softmax's
    backward): one autograd node instead of the dozen views, copies and kernels around
    `scaled_dot_product_attention`'s CPU flash kernel at the small head dimensions LLC estimates sample."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        pattern = torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale), -1)
        ctx.save_for_backward(q, k, v, pattern)
        ctx.scale = scale
        return torch.bmm(pattern, v)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, pattern = ctx.saved_tensors
        dv = torch.bmm(pattern.transpose(1, 2), g)
        ds = torch._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), pattern, -1, pattern.dtype)
        ds.mul_(ctx.scale)
        return torch.bmm(ds, k), torch.bmm(ds.transpose(1, 2), q), dv, None, None


def _rotary(
    x: Tensor, cos: Tensor, sin: Tensor, sin_swapped: Tensor, swap: Callable[[Tensor], Tensor]
) -> Tensor:
    if torch.compiler.is_compiling():  # plain ops: the compiler fuses them and derives the backward
        return (x * cos + swap(x) * sin).contiguous()
    return _Rotary.apply(x, cos, sin, sin_swapped, swap)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.bmm(torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale), -1), v)
    return _CausalAttention.apply(q, k, v, mask, scale)
