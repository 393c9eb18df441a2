"""`FeatureBuildConfig`: what one streaming pass over a corpus collects for every SAE feature."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

CONFIG_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class FeatureBuildConfig:
    """Settings of a feature-database build (stored in the database, so a resumed build can check them)."""

    top_k: int = 20
    """top activating contexts kept per feature (exact: ties broken by the earliest token)"""
    n_samples: int = 24
    """firing contexts sampled uniformly per feature (shown grouped by activation quantile)"""
    window_left: int = 12
    """tokens of context kept before the activating token"""
    window_right: int = 4
    """tokens of context kept after the activating token"""
    hist_bins: int = 48
    """log-spaced histogram bins of the non-zero activations"""
    hist_min: float = 1e-3
    """lower edge of the histogram (smaller activations fall into the first bin)"""
    hist_max: float = 1e3
    """upper edge of the histogram (larger activations fall into the last bin)"""
    logit_k: int = 10
    """promoted and suppressed tokens kept per feature"""
    batch_size: int = 16
    """sequences per forward pass"""
    loss_effect: bool = True
    """estimate each feature's effect on the loss (one backward pass per batch, all features at once)"""
    cooccurrence: bool = True
    """count how often every pair of features fires on the same token"""
    cooc_max_tokens: int = 65536
    """co-occurrence is counted on the first this many tokens (pairs cost sum(L0^2) per token)"""
    cooc_k: int = 8
    """co-occurring features kept per feature (by Jaccard similarity)"""
    max_cooc_features: int = 8192
    """co-occurrence needs a d_sae x d_sae matrix: skipped above this many features per pass"""
    features_per_pass: int = 0
    """features per streaming pass (0: all features in one pass); smaller bounds memory on huge SAEs"""
    checkpoint_every: int = 0
    """save the streaming state every this many batches so an interrupted build resumes (0: never)"""
    seed: int = 0
    """seed of the (deterministic) hash that picks the sampled contexts"""
    version: int = CONFIG_VERSION
    """format version of this config"""

    def __post_init__(self) -> None:
        for name in (
            "top_k",
            "hist_bins",
            "batch_size",
            "window_left",
            "window_right",
            "n_samples",
            "logit_k",
            "cooc_k",
            "features_per_pass",
            "checkpoint_every",
            "max_cooc_features",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for name in ("top_k", "hist_bins", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if not 0 < self.hist_min < self.hist_max:
            raise ValueError(
                f"need 0 < hist_min < hist_max, got hist_min={self.hist_min}, hist_max={self.hist_max}"
            )

    @property
    def window(self) -> int:
        return self.window_left + 1 + self.window_right

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureBuildConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FeatureBuildConfig fields {unknown}; valid: {sorted(known)}")
        return cls(**data)
