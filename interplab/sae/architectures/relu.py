"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic's "Towards Monosemanticity" recipe)."""

from __future__ import annotations

from torch import Tensor

from interplab.sae.base import SAE
from interplab.sae.config import Architecture
from interplab.sae.registry import register_architecture


@register_architecture
class ReLUSAE(SAE):
    architecture = Architecture.RELU

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def train_forward(self, x_in: Tensor, target: Tensor, dead_mask: Tensor | None):
        acts = (x_in @ self.W_enc + self.b_enc).relu()
        recon = (acts @ self.W_dec + self.b_dec).float()
        # sum_i |a_i| * ||W_dec[i]||: scale-invariant, so shrinking the encoder cannot game the penalty
        l1 = (acts.float() @ self.W_dec.norm(dim=-1)).mean()
        return recon, acts, l1, recon.new_zeros(()), (acts > 0).sum(0)
