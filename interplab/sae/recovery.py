"""Ground truth for SAEs: synthetic activations built from known sparse directions, and scores of how well
an SAE's decoder recovers them (mean max cosine similarity, fraction recovered above a cosine)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.io import atomic_write_json


@dataclass(frozen=True, kw_only=True)
class SyntheticFeatures:
    """x = sum_i c_i * f_i over n_features random unit directions f_i in d dimensions, each active
    independently with ``probability`` and coefficient uniform in [min_coef, 1] when active."""

    n_features: int = 256
    """number of ground-truth directions"""
    d: int = 64
    """dimension of the activations"""
    probability: float = 1 / 32
    """chance that each feature is active on a token"""
    min_coef: float = 0.0
    """smallest coefficient of an active feature"""
    seed: int = 0
    """seed for the directions"""

    def directions(self) -> Float[Tensor, "n_features d"]:
        g = torch.Generator().manual_seed(self.seed)
        f = torch.randn(self.n_features, self.d, generator=g)
        return f / f.norm(dim=-1, keepdim=True)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Float[Tensor, "n d"]:
        active = torch.rand(n, self.n_features, generator=generator) < self.probability
        coef = self.min_coef + (1 - self.min_coef) * torch.rand(n, self.n_features, generator=generator)
        return (active * coef) @ self.directions()

    def batches(
        self, batch_size: int, n_batches: int, seed: int = 1, key: str = "x"
    ) -> Iterator[dict[str, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        dirs = self.directions()
        for _ in range(n_batches):
            active = torch.rand(batch_size, self.n_features, generator=g) < self.probability
            coef = self.min_coef + (1 - self.min_coef) * torch.rand(batch_size, self.n_features, generator=g)
            yield {key: (active * coef) @ dirs}


@dataclass(frozen=True)
class FeatureRecovery:
    """How well learned directions match true ones."""

    max_cosine: Tensor
    """[n_true] best |cosine| of each true direction with any learned direction"""
    threshold: float
    """the cosine above which a true direction counts as recovered"""

    @property
    def mean_max_cosine(self) -> float:
        return float(self.max_cosine.mean())

    @property
    def fraction_recovered(self) -> float:
        return float((self.max_cosine >= self.threshold).float().mean())

    def __repr__(self) -> str:
        return (
            f"FeatureRecovery(mean_max_cosine={self.mean_max_cosine:.3f}, "
            f"fraction_recovered={self.fraction_recovered:.3f} at cos>={self.threshold})"
        )

    def plot(self):
        import plotly.graph_objects as go

        fig = go.Figure(go.Histogram(x=self.max_cosine.tolist(), nbinsx=50))
        fig.update_layout(
            title=repr(self), xaxis_title="max cosine with a learned direction", yaxis_title="true features"
        )
        return fig

    def save(self, path: str | Path) -> None:
        atomic_write_json(
            path,
            {
                "mean_max_cosine": self.mean_max_cosine,
                "fraction_recovered": self.fraction_recovered,
                "threshold": self.threshold,
                "max_cosine": self.max_cosine.tolist(),
            },
        )


class Layout(str, Enum):
    """Where the directions of a weight matrix lie."""

    ROWS = "rows"  # [n, d]: one direction per row (an SAE's W_dec, `SyntheticFeatures.directions()`)
    COLUMNS = "columns"  # [d, n]: one direction per column (an SAE's W_enc, a toy model's W [m, n])


def feature_recovery(
    learned: Tensor,
    true: Tensor,
    threshold: float = 0.9,
    *,
    learned_layout: Layout | str = Layout.ROWS,
    true_layout: Layout | str = Layout.ROWS,
) -> FeatureRecovery:
    """Score learned directions (e.g. an SAE's W_dec rows) against true ones by |cosine similarity|.

    Each matrix says where its directions lie: ``Layout.ROWS`` ([n, d], the default for both) or
    ``Layout.COLUMNS`` ([d, n], e.g. a toy model's ``W[instance]`` of shape [n_hidden, n_features]).

    >>> from interplab.sae import SAEConfig, create_sae
    >>> sae = create_sae(SAEConfig(d_in=2, d_sae=8, architecture="topk", k=2))   # an SAE on the toy's hidden layer
    >>> recovery = feature_recovery(sae.W_dec, toy.W[0], true_layout="columns")
    """
    learned = _as_rows(learned, Layout(learned_layout), "learned")
    true = _as_rows(true, Layout(true_layout), "true")
    if learned.shape[-1] != true.shape[-1]:
        raise ValueError(
            f"learned directions have width {learned.shape[-1]}, true ones {true.shape[-1]} (as rows: "
            f"learned {tuple(learned.shape)} with {Layout(learned_layout).value}, true {tuple(true.shape)} "
            f"with {Layout(true_layout).value}); a [d, n] matrix needs layout 'columns'"
        )
    a = learned.float() / learned.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = true.float() / true.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return FeatureRecovery(max_cosine=(b @ a.T).abs().amax(-1), threshold=threshold)


def _as_rows(w: Tensor, layout: Layout, name: str) -> Float[Tensor, "n d"]:
    if w.ndim != 2:
        raise ValueError(f"{name} directions must be a 2-d matrix, got shape {tuple(w.shape)}")
    return w.detach() if layout is Layout.ROWS else w.detach().T
