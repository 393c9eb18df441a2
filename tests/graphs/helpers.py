"""What the graph tests share: cross-layer transcoders with weights set by hand, tiny random models."""

from __future__ import annotations

import torch

from interplab.model import ModelConfig, Transformer
from interplab.sae.clt import CLTActivation, CLTConfig, CrossLayerTranscoder
from tests.model.model_variants import VARIANTS, randomize


def HandCLTConfig(**kw) -> CLTConfig:  # noqa: N802
    """A CLTConfig (JumpReLU unless told otherwise)."""
    return CLTConfig(**kw)


def HandCLT(cfg: CLTConfig) -> CrossLayerTranscoder:  # noqa: N802
    """A CLT whose weights the test sets by hand: all zero."""
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for p in clt.parameters():
            p.zero_()
    return clt


def random_clt(
    model: Transformer, d_sae: int = 12, *, hook_in: str | None = None, cross_layer=True
) -> HandCLT:
    """A random CLT for ``model`` whose features fire about half the time."""
    cfg = model.cfg
    hook = hook_in or (
        "blocks.{layer}.hook_mlp_in" if cfg.parallel_attn_mlp else "blocks.{layer}.hook_resid_mid"
    )
    clt = HandCLT(
        HandCLTConfig(
            n_layers=cfg.n_layers, d_model=cfg.d_model, d_sae=d_sae, hook_in=hook, cross_layer=cross_layer
        )
    )
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        clt.threshold.zero_()
    return clt


def variant_model(name: str) -> Transformer:
    model = Transformer(VARIANTS[name])
    randomize(model)
    return model


__all__ = ["CLTActivation", "HandCLT", "HandCLTConfig", "ModelConfig", "random_clt", "variant_model"]
