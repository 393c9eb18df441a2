"""Small models and discovery tasks shared by the discovery and metrics tests."""

import torch

from interplab.circuits import DiscoveryTask
from interplab.circuits.planted import induction_data
from interplab.model.config import ModelConfig
from interplab.model.transformer import Transformer


def random_model(**overrides):
    torch.manual_seed(0)
    kw = dict(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=20, n_ctx=8) | overrides
    model = Transformer(ModelConfig(**kw)).eval()
    with torch.no_grad():  # biases everywhere, so a head's bias share matters
        for block in model.blocks:
            block.attn.b_O.normal_(0, 0.5)
    return model


def random_task(n=12, d_vocab=20, n_ctx=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (2 * n, n_ctx), generator=gen)
    labels = torch.randint(0, d_vocab, (2 * n,), generator=gen)

    def metric(logits, rows):
        return logits[:, -1].log_softmax(-1)[torch.arange(rows.numel()), labels[rows]]

    return DiscoveryTask(
        name="random", tokens=tokens, clean=torch.arange(n), corrupt=torch.arange(n, 2 * n), metric=metric
    )


def planted_task(n=120):
    tokens, labels, _ = induction_data(2 * n)

    def metric(logits, rows):
        return logits[:, -1].float().log_softmax(-1)[torch.arange(rows.numel()), labels[rows]]

    rows = torch.arange(n)
    return DiscoveryTask(name="planted", tokens=tokens, clean=rows, corrupt=rows + n, metric=metric)
