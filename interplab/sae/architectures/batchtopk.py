"""BatchTopK SAE (Bussmann et al. 2024): keep the k * batch largest activations over the whole batch while
training; at inference a single threshold (the running mean of the smallest kept activation) replaces it."""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.sae.base import SAE
from interplab.sae.config import Architecture, SAEConfig
from interplab.sae.registry import register_architecture


@register_architecture
class BatchTopKSAE(SAE):
    architecture = Architecture.BATCHTOPK
    unit_norm_decoder = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))

    def activation(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold.to(pre.dtype))

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None):
        x_in = self._sub_b_dec(x_s)
        pre = (x_in @ self.W_enc + self.b_enc).relu()
        flat = pre.flatten()
        n_keep = min(self.cfg.k * pre.shape[0], flat.numel())
        vals, idx = flat.topk(n_keep, sorted=False)
        acts = torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
        with torch.no_grad():
            positive = vals[vals > 0]
            if positive.numel():
                self.threshold.mul_(0.99).add_(0.01 * positive.min().float())
        recon = (acts @ self.W_dec + self.b_dec).float()
        zero = recon.new_zeros(())
        return recon, acts, zero, zero, None
