"""Shared fixtures: a tiny model and a planted SAE whose feature j fires exactly on token j.

The SAE here is a minimal ReLU SAE with the attribute names of `interplab.sae.SAE` (cfg.d_in, cfg.d_sae,
cfg.hook_name, W_enc, b_enc, W_dec, b_dec, encode, decode), so the tests exercise the same contract."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from interplab.model import ModelConfig, Transformer

HOOK = "blocks.0.hook_resid_pre"


class TinySAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, hook_name: str = HOOK) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_sae, hook_name=hook_name, architecture="relu")
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae) / d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_in) / d_in**0.5)
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec


def tiny_model(d_vocab: int = 40, n_ctx: int = 32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(
            d_model=32, n_layers=1, n_heads=2, d_vocab=d_vocab, n_ctx=n_ctx, positional="rotary", name="tiny"
        )
    )


def planted_sae(model: Transformer, d_sae: int) -> TinySAE:
    """Feature j reads the embedding of token j with a threshold halfway between its own and the largest
    other token's projection, so it fires exactly on token j (the site is resid_pre of block 0 = W_E[token]
    under rotary positions)."""
    w_e = model.W_E.detach()
    sae = TinySAE(model.cfg.d_model, d_sae)
    with torch.no_grad():
        for j in range(d_sae):
            d = w_e[j] / w_e[j].norm()
            proj = w_e @ d
            own, other = proj[j], torch.cat([proj[:j], proj[j + 1 :]]).max()
            assert own > other
            sae.W_enc[:, j] = d
            sae.b_enc[j] = -(own + other) / 2
        sae.b_dec.zero_()
    return sae
