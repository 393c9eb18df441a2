"""Sparse TopK kernels: only the k active latents of each token enter the decoder and the encoder's backward.

A dense TopK step costs about 10 * batch * d_in * d_sae FLOPs (encoder forward and weight gradient,
decoder forward and both gradients). Only the encoder's forward needs every latent (to find the top k);
everything else touches k of d_sae latents, so `TopKEncode` + `SparseDecode` cost about
2 * batch * d_in * d_sae + O(batch * k * d_in). The encoder matmul runs in the autocast dtype (bf16 on
CPUs with matrix units); gradients are accumulated in float32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype matmuls on ``t``'s device run in: the autocast dtype if autocast is on, else t's dtype."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _coo(rows: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size, check_invariants=False)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class TopKEncode(torch.autograd.Function):
    """(x_in [B, d_in], W_enc, b_enc, k) -> (values [B, k] after ReLU, indices [B, k])."""

    @staticmethod
    def forward(ctx, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
        dt = compute_dtype(x_in)
        with torch.autocast(x_in.device.type, enabled=False):
            pre = torch.addmm(b_enc.to(dt), x_in.to(dt), W_enc.to(dt))
            vals, idx = pre.topk(k, dim=-1, sorted=False)
            vals = vals.float().relu()
        ctx.save_for_backward(x_in, W_enc, vals, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals: Tensor, _grad_idx: Tensor | None):
        x_in, W_enc, vals, idx = ctx.saved_tensors
        b, k = idx.shape
        d_sae = W_enc.shape[1]
        g = torch.where(vals > 0, grad_vals, 0.0).float().reshape(-1)
        lat = idx.reshape(-1)
        tok = torch.arange(b, device=idx.device).repeat_interleave(k)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_W = torch.sparse.mm(_coo(lat, tok, g, (d_sae, b)), x_in.float()).T.to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, device=g.device, dtype=torch.float32).index_add_(0, lat, g)
        if ctx.needs_input_grad[0]:
            # rows are tokens with exactly k entries each: a CSR matrix with no sorting needed
            G = _csr(torch.arange(0, b * k + 1, k, device=idx.device), lat, g, (b, d_sae))
            grad_x = (G @ W_enc.float().T.contiguous()).to(x_in.dtype)
        return grad_x, grad_W, grad_b, None


class SparseDecode(torch.autograd.Function):
    """(values [B, k], indices [B, k], W_dec [d_sae, d_out]) -> values @ W_dec[indices] summed over k."""

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
        with torch.autocast(vals.device.type, enabled=False):
            out = F.embedding_bag(idx, W_dec.float(), per_sample_weights=vals.float(), mode="sum")
        ctx.save_for_backward(vals, idx, W_dec)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        vals, idx, W_dec = ctx.saved_tensors
        b, k = idx.shape
        grad_out = grad_out.float()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            # grad_vals[b, j] = grad_out[b] . W_dec[idx[b, j]]: a sampled dense-dense matmul at the k entries
            pattern = _csr(
                torch.arange(0, b * k + 1, k, device=idx.device),
                idx.reshape(-1),
                grad_out.new_zeros(b * k),
                (b, W_dec.shape[0]),
            )
            sampled = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.float().T, beta=0.0)
            grad_vals = sampled.values().view(b, k).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            tok = torch.arange(b, device=idx.device).repeat_interleave(k)
            G = _coo(idx.reshape(-1), tok, vals.float().reshape(-1), (W_dec.shape[0], b))
            grad_W = torch.sparse.mm(G, grad_out).to(W_dec.dtype)
        return grad_vals, None, grad_W


def topk_encode(
    x_in: Float[Tensor, "batch d_in"], W_enc: Tensor, b_enc: Tensor, k: int
) -> tuple[Float[Tensor, "batch k"], Int[Tensor, "batch k"]]:
    return TopKEncode.apply(x_in, W_enc, b_enc, k)


def sparse_decode(
    vals: Float[Tensor, "batch k"], idx: Int[Tensor, "batch k"], W_dec: Float[Tensor, "d_sae d_out"]
) -> Float[Tensor, "batch d_out"]:
    return SparseDecode.apply(vals, idx, W_dec)


def scatter_latents(vals: Tensor, idx: Tensor, d_sae: int) -> Tensor:
    """Dense [B, d_sae] latent activations from the sparse (values, indices) pair."""
    return torch.zeros(*vals.shape[:-1], d_sae, dtype=vals.dtype, device=vals.device).scatter_(-1, idx, vals)
