"""JumpReLU SAE (Rajamanoharan et al. 2024): acts = ReLU(z) * H(z - threshold), trained with an L0 penalty
through straight-through estimators that use a rectangle kernel of width ``cfg.jumprelu_bandwidth``.

Inference is SAELens' exactly: ``ReLU(z) * (z > threshold)``, so a file encodes the same here and there
whatever its thresholds. Training keeps ``threshold >= 0``: the parameter is the threshold itself (as in
SAELens), projected back onto [0, inf) before every training forward and after every optimizer step
(`apply_constraints`). A clamp inside the graph would stop the gradient of a threshold that reached 0 and let
the raw, negative value reach inference; a log-parameterisation keeps it positive too, but Adam moves a
parameter by about ``lr`` per step, so log(threshold) moves the threshold multiplicatively and a small initial
threshold (0.001) barely moves in a run of a few thousand steps (SAELens dropped it for this reason). An
initial threshold of 0 trains: the L0 estimator's gradient does not vanish at 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from interplab.sae.base import SAE, TrainStep
from interplab.sae.config import Architecture, SAEConfig
from interplab.sae.registry import register_architecture


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - t): exact gradient in z; d/dt = -(t / eps) * K((z - t) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return z * (z > t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, t = ctx.saved_tensors
        eps = ctx.eps
        grad_z = grad * (z > t)
        grad_t = (-(t / eps) * _rectangle((z - t) / eps) * grad).reshape(-1, t.shape[-1]).sum(0)
        return grad_z, grad_t.to(t.dtype), None


class _Step(torch.autograd.Function):
    """H(z - t): zero gradient in z; d/dt = -(1 / eps) * K((z - t) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, t = ctx.saved_tensors
        eps = ctx.eps
        grad_t = (-(1.0 / eps) * _rectangle((z - t) / eps) * grad).reshape(-1, t.shape[-1]).sum(0)
        return torch.zeros_like(z), grad_t.to(t.dtype), None


@register_architecture
class JumpReLUSAE(SAE):
    architecture = Architecture.JUMPRELU
    latent_axes = {**SAE.latent_axes, "threshold": 0}

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=cfg.dtype.torch)
        )
        """[d_sae] per-latent threshold on the pre-activation (SAELens' ``threshold``)"""

    def latent_reset_values(self) -> dict[str, float]:
        return {"b_enc": 0.0, "threshold": self.cfg.jumprelu_init_threshold}

    def pre_acts(self, x: Tensor) -> Tensor:
        # ``x @ W + b`` as the training forward computes it (the base class's addmm rounds differently at
        # d_in >= 512), which also keeps the bias add in float32 under bf16 autocast as training does
        x_in = self._center(x)
        return x_in @ self.W_enc.to(x_in.dtype) + self.b_enc.to(x_in.dtype)

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold.to(pre.dtype)).to(pre.dtype)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        super().apply_constraints()
        self.threshold.clamp_(min=0.0)

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None) -> TrainStep:
        with torch.no_grad():  # projected on the data, not clamped in the graph (see the module docstring)
            self.threshold.clamp_(min=0.0)
        x_in = self._sub_b_dec(x_s)
        pre = (x_in @ self.W_enc + self.b_enc).float()
        t = self.threshold.float()
        acts = _JumpReLU.apply(pre, t, self.cfg.jumprelu_bandwidth)
        recon = (acts @ self.W_dec + self.b_dec).float()
        l0 = _Step.apply(pre, t, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return TrainStep(reconstruction=recon, feature_acts=acts, sparsity=l0, aux=recon.new_zeros(()))
