import pytest
import torch

from interplab.model import ModelConfig, Transformer

VARIANTS = {
    "gpt2": {},
    "rotary-gqa-rms-gated": {
        "positional": "rotary",
        "n_kv_heads": 2,
        "normalization": "rmsnorm",
        "gated_mlp": True,
        "act_fn": "silu",
    },
    "smear-attn-only": {"positional": "rotary", "smear_keys": True, "attn_only": True},
    "parallel": {"parallel_attn_mlp": True, "positional": "rotary"},
    "qk-norm-no-pre-norms": {  # OLMo-2's shape
        "positional": "rotary",
        "normalization": "rmsnorm",
        "qk_norm": "full",
        "pre_norms": False,
        "post_norms": True,
        "rotary_bases": (10.0, 1e4),
    },
}


def make_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    base = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_vocab": 50, "n_ctx": 16, "init_range": 0.2}
    base.update(kw)
    return Transformer(ModelConfig(**base))


@pytest.fixture
def model() -> Transformer:
    return make_model()


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (3, 7), generator=g), torch.randint(0, 50, (3, 7), generator=g)
