"""The tiny model, token stream and configs that test_distributed.py and its torchrun worker share."""

import torch

from interplab.model import ModelConfig, Transformer
from interplab.sae.sweep import SAESweepConfig, parse_sweep
from interplab.sae.train import SAETrainConfig
from tests.sae.helpers import token_batches

HOOK = "blocks.0.hook_resid_post"
SWEEP = ["coefficient=0.01,0.03,0.1"]


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=32, d_mlp=64, name="tiny")
    )


def token_stream() -> list[torch.Tensor]:
    """21 token batches of 4 x 16 (15 rows kept per sequence: BOS dropped): 1260 rows."""
    return token_batches(21)


def train_config(steps: int) -> SAETrainConfig:
    # no dead latents: a resample draws from each rank's own rows (train_saes broadcasts rank 0's), not batch-exact
    return SAETrainConfig(
        total_steps=steps, lr=1e-2, coefficient=0.1, autocast=False, warmup_steps=2, log_every=3,
        checkpoint_every=4, dead_after_tokens=10**9, b_dec_init="zeros",
    )  # fmt: skip


def sweep_config() -> SAESweepConfig:
    return SAESweepConfig(
        architecture="relu", expansion=2, steps=12, batch_size=32, autocast=False, checkpoint_every=4,
        sweep=parse_sweep(SWEEP),
    )  # fmt: skip
