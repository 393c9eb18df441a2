"""JumpReLU SAE (Rajamanoharan et al. 2024): acts = z * H(z - threshold), trained with an L0 penalty through
straight-through estimators that use a rectangle kernel of width ``cfg.jumprelu_bandwidth``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from interplab.sae.base import SAE
from interplab.sae.config import Architecture, SAEConfig
from interplab.sae.registry import register_architecture


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - t): exact gradient in z; d/dt = -(t / eps) * K((z - t) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return z * (z > t)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, t = ctx.saved_tensors
        eps = ctx.eps
        grad_z = grad * (z > t)
        grad_t = (-(t / eps) * _rectangle((z - t) / eps) * grad).reshape(-1, t.shape[-1]).sum(0)
        return grad_z, grad_t.to(t.dtype), None


class _Step(torch.autograd.Function):
    """H(z - t): zero gradient in z; d/dt = -(1 / eps) * K((z - t) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, t = ctx.saved_tensors
        eps = ctx.eps
        grad_t = (-(1.0 / eps) * _rectangle((z - t) / eps) * grad).reshape(-1, t.shape[-1]).sum(0)
        return torch.zeros_like(z), grad_t.to(t.dtype), None


@register_architecture
class JumpReLUSAE(SAE):
    architecture = Architecture.JUMPRELU

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=cfg.dtype.torch)
        )

    def activation(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold.to(pre.dtype))

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None):
        x_in = self._sub_b_dec(x_s)
        pre = (x_in @ self.W_enc + self.b_enc).float()
        t = self.threshold.float().clamp_min(1e-6)
        acts = _JumpReLU.apply(pre, t, self.cfg.jumprelu_bandwidth)
        recon = (acts @ self.W_dec + self.b_dec).float()
        l0 = _Step.apply(pre, t, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return recon, acts, l0, recon.new_zeros(()), None
