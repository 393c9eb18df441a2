"""BatchTopK SAE (Bussmann et al. 2024): keep the k * batch largest activations over the whole batch while
training; at inference a single threshold replaces it: ``ReLU(z) * (z > threshold)``, the JumpReLU SAE it is
saved as. The threshold is SAELens' ``topk_threshold``: an exponential moving average (rate 0.01) of the
smallest kept positive activation of each training batch, updated outside autocast. Dead latents get the
AuxK loss of TopK (`interplab.sae.architectures.topk.aux_k_loss`)."""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.sae.architectures.topk import aux_k_loss
from interplab.sae.base import SAE, TrainStep
from interplab.sae.config import Architecture, SAEConfig
from interplab.sae.registry import register_architecture

#: rate of the threshold's moving average (SAELens' ``topk_threshold_lr`` default)
THRESHOLD_RATE = 0.01


@register_architecture
class BatchTopKSAE(SAE):
    architecture = Architecture.BATCHTOPK
    unit_norm_decoder = True
    aux_weight = 1 / 32
    threshold: Tensor  # buffer []: the running minimum kept activation, used at inference

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold.to(pre.dtype)).to(pre.dtype)

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None) -> TrainStep:
        assert self.cfg.k is not None  # SAEConfig requires k for this architecture
        x_in, b_enc = self._encoder_input_and_bias(x_s)
        pre = torch.addmm(b_enc, x_in, self.W_enc).relu()
        flat = pre.flatten()
        n_keep = min(self.cfg.k * pre.shape[0], flat.numel())
        vals, idx = flat.topk(n_keep, sorted=False)
        acts = torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
        with torch.no_grad(), torch.autocast(pre.device.type, enabled=False):
            positive = vals[vals > 0]
            if positive.numel():
                rate = THRESHOLD_RATE
                self.threshold.mul_(1 - rate).add_(rate * positive.min().float())
        recon = torch.addmm(self.b_dec, acts, self.W_dec).float()
        aux = aux_k_loss(self, x_in, b_enc, target - recon.detach(), dead_mask)
        return TrainStep(reconstruction=recon, feature_acts=acts, sparsity=recon.new_zeros(()), aux=aux)
