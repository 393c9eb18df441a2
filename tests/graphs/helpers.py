"""What the graph tests share: a hand-set cross-layer transcoder with the interface of GRAPHS.md (until
`interplab.sae.clt` lands it stands in for `CrossLayerTranscoder`), tiny random models, and the planted model
whose MLPs are exactly sparse in a known basis."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from interplab.model import ModelConfig, Transformer
from tests.model.model_variants import VARIANTS, randomize


@dataclass(frozen=True, kw_only=True)
class HandCLTConfig:
    n_layers: int
    d_model: int
    d_sae: int
    cross_layer: bool = True
    hook_in: str = "blocks.{layer}.hook_resid_mid"
    hook_out: str = "blocks.{layer}.hook_mlp_out"
    model_name: str | None = None


class HandCLT(nn.Module):
    """A JumpReLU cross-layer transcoder with weights set by hand (GRAPHS.md's layout)."""

    def __init__(self, cfg: HandCLTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, d, f = cfg.n_layers, cfg.d_model, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(n, d, f))
        self.b_enc = nn.Parameter(torch.zeros(n, f))
        self.threshold = nn.Parameter(torch.zeros(n, f))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(f, n - layer if cfg.cross_layer else 1, d)) for layer in range(n)]
        )
        self.b_dec = nn.Parameter(torch.zeros(n, d))

    def pre_acts(self, x: Tensor) -> Tensor:
        return torch.einsum("...ld,ldf->...lf", x, self.W_enc) + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def decoder(self, src: int, dst: int) -> Tensor:
        return self.W_dec[src][:, dst - src]

    def decode(self, acts: Tensor) -> Tensor:
        n = self.cfg.n_layers
        out = [self.b_dec[dst].expand(*acts.shape[:-2], -1) for dst in range(n)]
        for src in range(n):
            dsts = range(src, n) if self.cfg.cross_layer else (src,)
            for dst in dsts:
                out[dst] = out[dst] + acts[..., src, :] @ self.decoder(src, dst)
        return torch.stack(out, dim=-2)


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


__all__ = ["HandCLT", "HandCLTConfig", "ModelConfig", "random_clt", "variant_model"]
