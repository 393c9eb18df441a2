"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic's "Towards Monosemanticity" recipe)."""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.sae.base import SAE, TrainStep
from interplab.sae.config import Architecture
from interplab.sae.registry import register_architecture


@register_architecture
class ReLUSAE(SAE):
    architecture = Architecture.RELU

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def encode(self, x: Tensor) -> Tensor:
        # the ReLU in place on the fresh pre-activations: one [n, d_sae] tensor per call instead of two (a
        # feature-DB build encodes ~16 MB per batch, and each fresh allocation of that size page-faults)
        return self.pre_acts(self.flat_input(x)).relu_()

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None) -> TrainStep:
        x_in, b_enc = self._encoder_input_and_bias(x_s)
        # addmm keeps the whole product in the autocast dtype (x @ W + b would promote it back to float32)
        acts = torch.addmm(b_enc, x_in, self.W_enc).relu()
        recon = torch.addmm(self.b_dec, acts, self.W_dec).float()
        # sum_i |a_i| * ||W_dec[i]||: scale-invariant, so shrinking the encoder cannot game the penalty
        l1 = (acts @ self.W_dec.norm(dim=-1)).float().mean()
        return TrainStep(reconstruction=recon, feature_acts=acts, sparsity=l1, aux=recon.new_zeros(()))
