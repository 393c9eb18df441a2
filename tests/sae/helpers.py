"""Shared helpers for the SAE tests."""

import torch


def token_batches(n: int, batch: int = 4, pos: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50, (batch, pos), generator=g) for _ in range(n)]
