"""Shared fixtures: a tiny model and a planted SAE whose feature j fires exactly on token j.

The SAEs are real `interplab.sae` ReLU SAEs whose weights are set by hand."""

from __future__ import annotations

import torch

from interplab.model import ModelConfig, Transformer
from interplab.sae import SAEConfig, create_sae

HOOK = "blocks.0.hook_resid_pre"


def make_sae(d_in: int, d_sae: int, hook_name: str = HOOK):
    """A ReLU `interplab.sae.SAE` with random encoder/decoder (std 1/sqrt(d_in)) and zero biases."""
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu", hook_name=hook_name))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
        sae.b_dec.zero_()
    return sae


def tiny_model(d_vocab: int = 40, n_ctx: int = 32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(
            d_model=32, n_layers=1, n_heads=2, d_vocab=d_vocab, n_ctx=n_ctx, positional="rotary", name="tiny"
        )
    )


def planted_sae(model: Transformer, d_sae: int):
    """Feature j reads the embedding of token j with a threshold halfway between its own and the largest
    other token's projection, so it fires exactly on token j (the site is resid_pre of block 0 = W_E[token]
    under rotary positions)."""
    w_e = model.W_E.detach()
    sae = make_sae(model.cfg.d_model, d_sae)
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
