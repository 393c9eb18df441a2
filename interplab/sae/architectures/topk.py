"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token; AuxK loss revives dead latents.

Training uses the sparse kernels (`interplab.sae.kernels`): the decoder and the encoder's backward touch
only the k active latents of each token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.sae.base import SAE, TrainStep
from interplab.sae.config import Architecture
from interplab.sae.kernels import scatter_latents, sparse_decode, topk_encode
from interplab.sae.registry import register_architecture


@register_architecture
class TopKSAE(SAE):
    architecture = Architecture.TOPK
    unit_norm_decoder = True
    aux_weight = 1 / 32

    def activation(self, pre: Tensor) -> Tensor:
        assert self.cfg.k is not None  # SAEConfig requires k for this architecture
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return scatter_latents(vals.relu(), idx, self.cfg.d_sae)

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None) -> TrainStep:
        assert self.cfg.k is not None  # SAEConfig requires k for this architecture
        x_in, b_enc = self._encoder_input_and_bias(x_s)
        x2 = x_in.reshape(-1, x_in.shape[-1])
        vals, idx = topk_encode(x2, self.W_enc, b_enc, self.cfg.k)
        recon = sparse_decode(vals, idx, self.W_dec) + self.b_dec
        counts = torch.bincount(idx[vals > 0], minlength=self.cfg.d_sae)
        aux = aux_k_loss(self, x2, b_enc, target.reshape(-1, target.shape[-1]) - recon.detach(), dead_mask)
        return TrainStep(
            reconstruction=recon,
            feature_acts=None,
            sparsity=recon.new_zeros(()),
            aux=aux,
            latent_counts=counts,
        )


def aux_k_loss(sae: SAE, x_in: Tensor, b_enc: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
    """AuxK (Gao et al. 2024): reconstruct the residual error ``residual`` [batch, d_in] from the top k_aux =
    d_in / 2 dead latents of each token, normalised by the residual's variance; 0 when no latent is dead.
    ``x_in`` is the encoder input (b_dec already subtracted), ``b_enc`` the encoder bias to use with it."""
    if dead_mask is None or not bool(dead_mask.any()):
        return residual.new_zeros(())
    n_dead = int(dead_mask.sum())
    k_aux = max(1, min(sae.cfg.d_in // 2, n_dead))
    dead = dead_mask.nonzero().squeeze(-1)
    vals, sub = topk_encode(x_in, sae.W_enc[:, dead], b_enc[dead], k_aux)
    est = sparse_decode(vals, sub, sae.W_dec[dead])
    denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    return (est - residual).pow(2).sum(-1).mean() / denom
