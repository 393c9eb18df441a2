"""What a trained toy model represents: W^T W, feature norms, superposition, dimensionality (Elhage et al.)
and capacity (Scherlis et al., Redwood), the sparsity-importance phase diagram, and plots of each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.io import atomic_write_json
from interplab.plots import save_figure
from interplab.toy import plots as toy_plots
from interplab.toy.model import ToyConfig, ToyModel, train_toy


@dataclass(frozen=True)
class ToyAnalysis:
    """Per-instance geometry of a `ToyModel`."""

    gram: Float[Tensor, "instance n_features n_features"]
    """W^T W: how each feature's direction overlaps the others"""
    norms: Float[Tensor, "instance n_features"]
    """||W_i||: ~1 when feature i is represented, ~0 when it is dropped"""
    superposition: Float[Tensor, "instance n_features"]
    """sum over j != i of (W_i_hat . W_j)^2: how much other features interfere with feature i"""
    dimensionality: Float[Tensor, "instance n_features"]
    """D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2, the fraction of a dimension feature i gets (equal to
    Scherlis et al.'s capacity C_i = (W_i . W_i)^2 / sum_j (W_i . W_j)^2)"""
    n_hidden: int

    @property
    def capacity(self) -> Float[Tensor, "instance n_features"]:
        return self.dimensionality

    @property
    def total_capacity(self) -> Float[Tensor, " instance"]:
        """sum_i C_i <= n_hidden: how many dimensions' worth of features the instance stores."""
        return self.dimensionality.sum(-1)

    @property
    def features_per_dimension(self) -> Float[Tensor, " instance"]:
        """||W||_F^2 / m (Elhage et al.'s "dimensions per feature" is its inverse)."""
        return self.norms.pow(2).sum(-1) / self.n_hidden

    def plot(self, instance: int | None = None) -> Any:
        return toy_plots.toy_overview(self, instance)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            path / "toy_analysis.json",
            {
                "norms": self.norms,
                "superposition": self.superposition,
                "dimensionality": self.dimensionality,
                "total_capacity": self.total_capacity,
                "gram": self.gram,
            },
        )
        save_figure(self.plot(), path / "toy_analysis.html")
        return path


@torch.no_grad()
def analyze(model: ToyModel) -> ToyAnalysis:
    W = model.W.detach().float()  # [inst, m, n]
    gram = W.transpose(1, 2) @ W  # [inst, n, n]
    norms = W.norm(dim=1)  # [inst, n]
    W_hat = W / norms.clamp_min(1e-8)[:, None, :]
    overlap = W_hat.transpose(1, 2) @ W  # [inst, i, j] = W_i_hat . W_j
    sq = overlap.pow(2)
    eye = torch.eye(W.shape[2], dtype=torch.bool)
    superposition = sq.masked_fill(eye, 0).sum(-1)
    dimensionality = norms.pow(2) / sq.sum(-1).clamp_min(1e-12)
    return ToyAnalysis(
        gram=gram,
        norms=norms,
        superposition=superposition,
        dimensionality=dimensionality,
        n_hidden=model.cfg.n_hidden,
    )


@dataclass(frozen=True)
class PhaseDiagram:
    """Elhage et al.'s 2-features-in-1-dimension phase diagram: what the model does with feature 2 as its
    relative importance and the features' sparsity vary."""

    sparsities: Tensor
    """[n_s] sparsity 1 - p of both features (rows)"""
    importances: Tensor
    """[n_r] importance of feature 2 relative to feature 1 (columns)"""
    phase: Tensor
    """[n_s, n_r] 0: feature 2 not represented, 1: feature 2 gets the dimension alone, 2: superposition
    (both features share the dimension, antipodally)"""
    norms: Tensor
    """[n_s, n_r, 2] ||W_1||, ||W_2||"""

    LABELS = ("not represented", "dedicated dimension", "superposition")

    def plot(self) -> Any:
        return toy_plots.phase_diagram(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            path / "phase_diagram.json",
            {
                "sparsities": self.sparsities,
                "importances": self.importances,
                "phase": self.phase,
                "norms": self.norms,
                "labels": self.LABELS,
            },
        )
        save_figure(self.plot(), path / "phase_diagram.html")
        return path


def phase_diagram(
    sparsities: Tensor | None = None,
    importances: Tensor | None = None,
    *,
    steps: int = 3000,
    batch_size: int = 1024,
    lr: float = 1e-2,
    restarts: int = 3,
    seed: int = 0,
) -> PhaseDiagram:
    """Train ``restarts`` n=2, m=1 models per (sparsity, importance) pair, all in one batch; keep the one
    with the lowest loss on fresh data (escaping poor local minima) and classify it."""
    sparsities = torch.tensor([0.0, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99]) if sparsities is None else sparsities
    importances = torch.logspace(-1, 1, 9) if importances is None else importances
    n_s, n_r = len(sparsities), len(importances)
    cells = n_s * n_r
    prob = (1 - sparsities.float())[:, None].expand(n_s, n_r).reshape(-1, 1).expand(-1, 2).repeat(restarts, 1)
    imp = torch.stack([torch.ones(n_r), importances.float()], -1)[None].expand(n_s, n_r, 2).reshape(-1, 2)
    cfg = ToyConfig(
        n_features=2,
        n_hidden=1,
        n_instances=cells * restarts,
        feature_probability=prob.tolist(),
        importance=imp.repeat(restarts, 1).tolist(),
    )
    model = ToyModel(cfg, seed=seed)
    train_toy(model, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    with torch.no_grad():
        eval_loss = model.loss_per_instance(
            model.generate_batch(16384, torch.Generator().manual_seed(seed + 1))
        )
    best = eval_loss.view(restarts, cells).argmin(0)  # [cells]
    W = model.W.detach()[:, 0, :].view(restarts, cells, 2)
    norms = W[best, torch.arange(cells)].abs()  # [cells, 2]
    represented = norms > 0.5
    phase = torch.where(represented.all(-1), 2, torch.where(represented[:, 1] & ~represented[:, 0], 1, 0))
    return PhaseDiagram(
        sparsities=sparsities,
        importances=importances,
        phase=phase.reshape(n_s, n_r),
        norms=norms.reshape(n_s, n_r, 2),
    )
