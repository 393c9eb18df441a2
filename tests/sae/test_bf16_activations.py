"""SAE training on bfloat16 activations (a bf16 model's cache, or a bf16 activation store): the SAE keeps its
float32 weights and learns (the reconstruction error falls), with and without bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from interplab.model import ModelConfig, Transformer
from interplab.sae import SAEConfig, create_sae
from interplab.sae.train import SAETrainConfig, train_saes

HOOK = "blocks.0.hook_resid_post"


def _bf16_activations() -> torch.Tensor:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=4, d_vocab=60, n_ctx=32)).to(
        torch.bfloat16
    )
    _, cache = model.run_with_cache(torch.randint(0, 60, (64, 32)), names=[HOOK])
    return cache[HOOK].reshape(-1, 32)


@pytest.mark.parametrize("autocast", [True, False])
def test_topk_sae_trains_on_bf16_activations(autocast):
    x = _bf16_activations()
    assert x.dtype == torch.bfloat16
    sae = create_sae(SAEConfig(d_in=32, d_sae=128, architecture="topk", k=8, hook_name=HOOK))
    batches = [{HOOK: b} for b in x.split(256)] * 3
    cfg = SAETrainConfig(total_steps=len(batches), log_every=4, lr=3e-3, autocast=autocast)
    result = train_saes(sae, batches, cfg)
    fvu = [r["fvu"] for r in result.history]
    assert all(p.dtype == torch.float32 for p in result.saes["sae"].parameters())
    assert fvu[-1] < 0.7 * fvu[0], fvu
