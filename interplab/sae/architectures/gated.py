"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire, a magnitude path (sharing
W_enc, rescaled by exp(r_mag)) decides how much. ``b_enc`` is the gate bias (SAELens' ``b_gate``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from interplab.sae.base import SAE, TrainStep
from interplab.sae.config import Architecture, SAEConfig
from interplab.sae.registry import register_architecture


@register_architecture
class GatedSAE(SAE):
    architecture = Architecture.GATED
    aux_weight = 1.0
    latent_axes = {**SAE.latent_axes, "r_mag": 0, "b_mag": 0}

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=cfg.dtype.torch))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=cfg.dtype.torch))

    def latent_reset_values(self) -> dict[str, float]:
        return {"b_enc": 0.0, "r_mag": 0.0, "b_mag": 0.0}

    def pre_acts(self, x: Tensor) -> Tensor:
        x_in = self._center(x)
        return x_in @ self.W_enc.to(x_in.dtype)  # the gate's bias and the magnitude path are applied below

    def activation(self, pre: Tensor) -> Tensor:
        gate = (pre + self.b_enc.to(pre.dtype)) > 0
        mag = (pre * self.r_mag.exp().to(pre.dtype) + self.b_mag.to(pre.dtype)).relu()
        return gate * mag

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None) -> TrainStep:
        x_in = self._sub_b_dec(x_s)
        proj = x_in @ self.W_enc
        pi_gate = proj + self.b_enc
        mag = (proj * self.r_mag.exp() + self.b_mag).relu()
        acts = (pi_gate > 0) * mag
        recon = (acts @ self.W_dec + self.b_dec).float()
        gate_acts = pi_gate.relu()
        l1 = (gate_acts.float() @ self.W_dec.norm(dim=-1)).mean()
        # the gate path alone must reconstruct too (frozen decoder), so the gate learns which latents matter
        aux_recon = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        aux = (aux_recon.float() - target).pow(2).sum(-1).mean()
        return TrainStep(reconstruction=recon, feature_acts=acts, sparsity=l1, aux=aux)
