"""Fixtures of the feature tests (the planted model and SAE live in `tests.features.planted`)."""

from __future__ import annotations

import pytest
import torch

from interplab.model import Transformer
from tests.features.planted import tiny_model


@pytest.fixture
def model() -> Transformer:
    return tiny_model()


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 40, (24, 16), generator=g)
