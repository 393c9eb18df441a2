import pytest
import torch

from interplab.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=32, d_mlp=64, name="tiny")
    )
