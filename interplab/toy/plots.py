"""Pictures of toy models: W^T W, feature norms coloured by superposition, dimensionality per feature, and
the sparsity-importance phase diagram (Plotly)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interplab.toy.analysis import PhaseDiagram, ToyAnalysis


def toy_overview(a: ToyAnalysis, instance: int | None = None) -> Any:
    """Row per instance (or just ``instance``): W^T W heatmap, feature norms (bar colour = superposition),
    and dimensionality per feature."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    insts = range(a.norms.shape[0]) if instance is None else [instance]
    insts = list(insts)
    fig = make_subplots(
        rows=len(insts),
        cols=3,
        subplot_titles=[
            t
            for i in insts
            for t in (
                f"instance {i}: W<sup>T</sup>W",
                "||W<sub>i</sub>|| (colour: superposition)",
                "dimensionality D<sub>i</sub>",
            )
        ],
        vertical_spacing=min(0.08, 0.5 / max(len(insts), 1)),
    )
    for row, i in enumerate(insts, start=1):
        n = a.norms.shape[1]
        fig.add_trace(
            go.Heatmap(z=a.gram[i].tolist(), colorscale="RdBu", zmid=0, zmin=-1, zmax=1, showscale=row == 1),
            row=row,
            col=1,
        )
        fig.add_trace(
            go.Bar(
                x=a.norms[i].tolist(),
                y=list(range(n)),
                orientation="h",
                marker={
                    "color": a.superposition[i].clamp(0, 1).tolist(),
                    "colorscale": "Viridis",
                    "cmin": 0,
                    "cmax": 1,
                },
                showlegend=False,
            ),
            row=row,
            col=2,
        )
        fig.add_trace(
            go.Scatter(x=list(range(n)), y=a.dimensionality[i].tolist(), mode="markers", showlegend=False),
            row=row,
            col=3,
        )
        fig.update_yaxes(autorange="reversed", row=row, col=1)
        fig.update_yaxes(autorange="reversed", row=row, col=2)
        fig.update_yaxes(range=[0, 1.05], row=row, col=3)
    fig.update_layout(height=260 * len(insts), template="plotly_white", title="toy model of superposition")
    return fig


def phase_diagram(p: PhaseDiagram) -> Any:
    import plotly.graph_objects as go

    colours = [
        [0, "#dddddd"],
        [0.33, "#dddddd"],
        [0.34, "#1f77b4"],
        [0.66, "#1f77b4"],
        [0.67, "#d62728"],
        [1, "#d62728"],
    ]
    fig = go.Figure(
        go.Heatmap(
            z=p.phase.tolist(),
            x=[f"{r:.2g}" for r in p.importances.tolist()],
            y=[f"{s:.3g}" for s in p.sparsities.tolist()],
            colorscale=colours,
            zmin=0,
            zmax=2,
            colorbar={"tickvals": [0.33, 1, 1.67], "ticktext": list(p.LABELS)},
            hovertemplate="importance %{x}<br>sparsity %{y}<br>phase %{z}<extra></extra>",
        )
    )
    fig.update_layout(
        title="2 features in 1 dimension: what happens to feature 2",
        xaxis_title="relative importance of feature 2",
        yaxis_title="feature sparsity (1 - p)",
        template="plotly_white",
    )
    return fig
