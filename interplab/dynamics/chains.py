"""The next-token loss of every SGLD chain of an interplab `Transformer` in one chain-batched forward.

`estimate_llc` steps C chains, each with its own copy of the weights. The generic path calls the model once
per chain (or under `torch.func.vmap`); for the common small transformers that is mostly per-operation
overhead, the model's own matmuls being a few hundred MFLOP. Here the chains' weights stay stacked along a
leading chain axis ``[C, ...]`` and one forward computes every chain's loss with batched matmuls over the
chains, so each operation runs once per step, not once per chain, on C times the data:

- each norm's weight and bias are folded into the matmul that reads it (``(x_hat w + b) W = x_hat (w W) + b
  W``), so a norm is one pass over the activations;
- rotary embeddings are folded into the Q and K projections: the rotation ``rotate(x)`` is a fixed linear map
  ``x M`` of the head's vector, so ``q M = x (W_Q M) + b_Q M`` comes out of the same matmul as ``q``, and the
  rotated query is ``q cos + (q M) sin``: two multiplies instead of a slice, negate and concatenate (and
  their backward);
- key smearing is linear, so it commutes with ``M`` and runs on ``k`` and ``k M`` alike;
- attention is explicit (scores, softmax, pattern times values) over ``[C * batch * heads, pos, pos]``.

The same function as the model's (`Transformer.forward` then `interplab.dynamics.llc.lm_loss`), to float
rounding: `tests/dynamics/test_chains.py` checks losses and gradients against the model, and whole SGLD runs
against the generic path. `supports` says which models it covers (the others take the generic path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from interplab.model.attention import apply_rotary
from interplab.model.config import Norm, Positional, QKNorm
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
        self.rotation: Tensor | None = None
        if cfg.positional is Positional.ROTARY:
            e, r = cfg.d_head, cfg.rotary_dim
            eye = torch.eye(r, device=self.own["embed.W_E"].device)
            ones = torch.ones(1, 1, 1, r, device=eye.device)
            # rotate(x) = x_rot cos + rotated sin: with cos = 0 and sin = 1 it is `rotated`, a linear map of x
            m = apply_rotary(eye[None, :, None, :], ones * 0, ones, cfg.rotary_style)[0, :, 0, :]
            self.rotation = torch.zeros(e, e, device=eye.device)
            self.rotation[:r, :r] = m

    def _tables(self, pos: int) -> tuple[Tensor, Tensor]:
        """cos and sin [pos, d_head] (1 and 0 on the dimensions rotary leaves alone)."""
        cos, sin = self.model._rotary_range(0, pos, self.own["embed.W_E"].device)
        cos, sin = cos[0, :, 0, :], sin[0, :, 0, :]
        e, r = self.cfg.d_head, self.cfg.rotary_dim
        if r < e:
            cos = torch.cat([cos, cos.new_ones(pos, e - r)], 1)
            sin = torch.cat([sin, sin.new_zeros(pos, e - r)], 1)
        return cos, sin

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
        if self.rotation is not None:
            cos, sin = (t.repeat(1, 2 * H) for t in self._tables(P))  # pos (2 H E): for q and k side by side
        for layer in range(cfg.n_layers):
            pre = f"blocks.{layer}."
            x, w, b = self._norm(resid, pre + "ln1", get)
            Wq, Wk, Wv = (
                get(pre + "attn." + n).permute(0, 2, 1, 3) for n in ("W_Q", "W_K", "W_V")
            )  # C D H E
            bq, bk, bv = (get(pre + "attn." + n) for n in ("b_Q", "b_K", "b_V"))  # C H E
            # columns [q k (q M) (k M) v]: the rotary pairs side by side, each [.., 2 H E] inner-contiguous
            ws, bs = [Wq, Wk], [bq, bk]
            if self.rotation is not None:
                ws += [Wq @ self.rotation, Wk @ self.rotation]
                bs += [bq @ self.rotation, bk @ self.rotation]
            Wcat = torch.stack([*ws, Wv], 2).reshape(C, D, -1)  # C D (n H E)
            bcat = torch.stack([*bs, bv], 1).reshape(C, 1, -1)
            if w is not None:
                bcat = bcat + (b[:, None] @ Wcat if b is not None else 0)
                Wcat = w.unsqueeze(-1) * Wcat
            # split, not sliced: a slice's backward fills a zero tensor of the whole width per slice
            parts = torch.baddbmm(bcat, x, Wcat).view(C * B, P, -1).split(2 * H * E, -1)
            qk, v = parts[0], parts[-1].view(C * B, P, H, E)
            qkr = parts[1] if self.rotation is not None else None
            if cfg.smear_keys:  # a gate of exactly 1 on the queries' half leaves them as they are
                gate = torch.sigmoid(get(pre + "attn.smear")).repeat_interleave(E, 1)
                gate = torch.cat([torch.ones_like(gate), gate], 1).repeat_interleave(B, 0)[:, None]
                qk = self._smear(qk, gate)
                qkr = None if qkr is None else self._smear(qkr, gate)
            if qkr is not None:
                qk = qk * cos + qkr * sin
            q, k = (t.view(C * B, P, H, E) for t in qk.split(H * E, -1))
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=True,
                scale=1 / cfg.attn_scale,
            )  # CB H P E
            z = z.transpose(1, 2).reshape(C, B * P, H * E)
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

    @staticmethod
    def _smear(k: Tensor, gate: Tensor) -> Tensor:
        """``gate k + (1 - gate) k_prev`` for ``k`` [batch pos features] (the previous position's, 0 at the
        first)."""
        prev = F.pad(k[:, :-1], (0, 0, 1, 0))
        return gate * k + (1 - gate) * prev
