"""SAE pictures: training curves, latent density histograms, and the sparsity frontier of a sweep
(L0 vs FVU, L0 vs CE loss recovered). All return Plotly figures; save with `interplab.plots.save_figure`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def training_curves(history: Sequence[dict[str, Any]], metric: str = "fvu") -> Any:
    """One line per SAE: ``metric`` (fvu, mse, l0, dead_fraction ...) against tokens."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name in dict.fromkeys(r["sae"] for r in history):
        rows = [r for r in history if r["sae"] == name]
        fig.add_trace(
            go.Scatter(x=[r["tokens"] for r in rows], y=[r[metric] for r in rows], mode="lines", name=name)
        )
    log = metric in ("fvu", "mse", "loss")
    fig.update_layout(
        title=f"SAE training: {metric}",
        xaxis_title="tokens",
        yaxis_title=metric,
        yaxis_type="log" if log else None,
        template="plotly_white",
    )
    return fig


def density_histogram(density: Tensor, *, title: str = "latent density") -> Any:
    """Histogram of log10(firing frequency) of alive latents; the dead count goes in the title."""
    import plotly.graph_objects as go

    density = torch.as_tensor(density).float()
    alive = density[density > 0]
    dead = int((density == 0).sum())
    fig = go.Figure(go.Histogram(x=alive.log10().tolist(), nbinsx=50))
    fig.update_layout(
        title=f"{title} ({dead} dead of {density.numel()})",
        xaxis_title="log10 firing frequency",
        yaxis_title="latents",
        template="plotly_white",
    )
    return fig


def sparsity_frontier(points: Sequence[dict[str, Any]], y: str = "fvu") -> Any:
    """Scatter of L0 against ``y`` (fvu or ce_loss_recovered), one marker per SAE; ``points`` are eval
    reports as dicts with a ``name``."""
    import plotly.graph_objects as go

    pts = sorted(points, key=lambda p: p["l0"])
    fig = go.Figure(
        go.Scatter(
            x=[p["l0"] for p in pts],
            y=[p[y] for p in pts],
            mode="lines+markers",
            text=[p.get("name", "") for p in pts],
        )
    )
    fig.update_layout(
        title=f"L0 vs {y}",
        xaxis_title="L0 (active latents per token)",
        yaxis_title=y,
        xaxis_type="log",
        template="plotly_white",
    )
    return fig
