"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs";
Nabeshima 2024): a BatchTopK SAE whose dictionary is nested. Each prefix of the latents, of widths
``cfg.matryoshka_widths`` (strictly increasing, the last = d_sae), must reconstruct the input on its own::

    acts  = BatchTopK(x)                                            (as `BatchTopKSAE`)
    loss  = sum over widths w of  || acts[:, :w] @ W_dec[:w] + b_dec - x ||^2   (summed over d_in, mean
            over tokens)  +  aux_weight * AuxK

the outermost term being the ordinary MSE (sae_lens' ``MatryoshkaBatchTopKTrainingSAE`` with its default
``use_matryoshka_aux_loss=False``). Early latents are thus pushed to carry the coarse, frequent features and
later ones the refinements, which limits feature absorption. At inference it encodes with the one threshold
that BatchTopK keeps, and is saved as that JumpReLU SAE (as sae_lens does); interplab's own config, widths
included, rides along in the file's metadata."""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.sae.architectures.batchtopk import BatchTopKSAE
from interplab.sae.base import TrainStep
from interplab.sae.config import Architecture
from interplab.sae.registry import register_architecture


@register_architecture
class MatryoshkaSAE(BatchTopKSAE):
    architecture = Architecture.MATRYOSHKA

    @property
    def widths(self) -> tuple[int, ...]:
        assert self.cfg.matryoshka_widths is not None  # SAEConfig resolves them for this architecture
        return self.cfg.matryoshka_widths

    def prefix_reconstructions(self, acts: Tensor) -> list[Tensor]:
        """The reconstruction (scaled units) from each prefix of ``acts`` [batch, d_sae], in width order;
        the last is the full reconstruction."""
        out, recon, start = [], self.b_dec.expand(acts.shape[0], -1), 0
        for width in self.widths:
            recon = torch.addmm(recon, acts[:, start:width], self.W_dec[start:width])
            out.append(recon.float())
            start = width
        return out

    def prefix_losses(self, x: Tensor) -> dict[int, Tensor]:
        """Width -> the squared error of that prefix's reconstruction of ``x`` [batch, d_in] (summed over
        d_in, mean over tokens; the SAE's normalised units), with the training encoder (BatchTopK)."""
        x_s = self.flat_input(x).to(self.W_enc.dtype) * self.act_scale.to(self.W_enc.dtype)
        step = BatchTopKSAE.train_forward(self, x_s, x_s.float(), None)
        assert step.feature_acts is not None
        recons = self.prefix_reconstructions(step.feature_acts)
        return {w: (r - x_s.float()).pow(2).sum(-1).mean() for w, r in zip(self.widths, recons, strict=True)}

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None) -> TrainStep:
        step = super().train_forward(x_s, target, dead_mask)
        assert step.feature_acts is not None
        inner = self.prefix_reconstructions(step.feature_acts)[:-1]  # the outer one is the ordinary MSE
        extra = sum(((r - target).pow(2).sum(-1).mean() for r in inner), step.reconstruction.new_zeros(()))
        return TrainStep(
            reconstruction=step.reconstruction,
            feature_acts=step.feature_acts,
            sparsity=step.sparsity,
            aux=step.aux,
            extra_loss=extra,
        )
