"""`Circuit`: a set of edges of the component graph, its faithfulness, and a picture (SVG, no graphviz)."""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.engine import Ablation, EdgeEngine, Spec
from interplab.circuits.graph import ComponentGraph, Edge, Node, NodeKind
from interplab.io import atomic_write_text
from interplab.model.transformer import Transformer
from interplab.runs import REPORT, Kind, write_json

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab_out"], Int[Tensor, " batch"]], Float[Tensor, " batch"]]


@dataclass(frozen=True, kw_only=True)
class DiscoveryTask:
    """What circuit discovery measures: clean and corrupted inputs and a metric."""

    name: str
    """shown in reports"""
    tokens: Int[Tensor, "rows pos"]
    """the data set; ``clean`` and ``corrupt`` index its rows"""
    clean: Int[Tensor, " batch"]
    """rows the model runs on"""
    corrupt: Int[Tensor, " batch"] | Ablation
    """rows whose activations replace those of edges outside the circuit (or an ablation)"""
    metric: MetricFn
    """``metric(logits, clean_rows)`` -> one value per example (higher = more of the behaviour)"""
    position: int = -1
    """the position whose output distribution KL divergence compares"""
    attention_mask: Tensor | None = None
    """1 for real tokens, 0 for padding"""

    def engine(self, model: Transformer) -> EdgeEngine:
        return EdgeEngine(model, self.tokens, self.attention_mask)

    def corrupt_value(self) -> Spec | Ablation:
        return self.corrupt if isinstance(self.corrupt, Ablation) else Spec(self.corrupt)


def kl_from(reference: Tensor, logits: Tensor, position: int) -> Tensor:
    """KL(reference || logits) at ``position``, mean over the batch."""
    p = torch.log_softmax(reference[:, position].float(), -1)
    q = torch.log_softmax(logits[:, position].float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean()


def circuit_spec(engine: EdgeEngine, task: DiscoveryTask, keep: set[Edge]) -> Spec:
    """The patched model in which every edge outside ``keep`` carries the corrupted value."""
    value = task.corrupt_value()
    return Spec(task.clean, {e: value for e in engine.graph.edges if e not in keep}, propagate=True)


@dataclass(frozen=True)
class Faithfulness:
    """The metric of the full model, the circuit (every other edge corrupted) and the corrupted model."""

    metric_full: float
    metric_circuit: float
    metric_corrupt: float
    fraction: float
    """(circuit - corrupt) / (full - corrupt): 1 = the circuit alone does everything the model does"""
    kl: float
    """KL(full || circuit) at the task's position"""


def faithfulness(engine: EdgeEngine, task: DiscoveryTask, edges: set[Edge]) -> Faithfulness:
    full = engine.run(Spec(task.clean))
    circ = engine.run(circuit_spec(engine, task, edges))
    corr = engine.run(circuit_spec(engine, task, set()))
    m = [float(task.metric(x, task.clean).mean()) for x in (full, circ, corr)]
    denom = m[0] - m[2]
    frac = (m[1] - m[2]) / denom if denom != 0 else float("nan")
    return Faithfulness(m[0], m[1], m[2], frac, float(kl_from(full, circ, task.position)))


@dataclass(frozen=True)
class Circuit:
    """A set of edges found by a method, with its faithfulness and (when the method gives them) edge scores."""

    edges: tuple[str, ...]
    method: str
    task: str
    faithfulness: Faithfulness
    n_edges_total: int
    scores: dict[str, float] = field(default_factory=dict)
    """the method's score of every edge (EAP: estimated metric change; ACDC: KL change when removed)"""
    layout: dict[str, tuple[int, int]] = field(default_factory=dict)
    """node name -> (column, row) for pictures"""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.edges:
            left, right = e.split("->")
            seen[left] = None
            seen[right.rsplit(".", 1)[0] if right.count(".") == 2 else right] = None
        return list(seen)

    def __repr__(self) -> str:
        f = self.faithfulness
        return (
            f"Circuit({self.method} on {self.task}: {len(self.edges)}/{self.n_edges_total} edges, "
            f"faithfulness {f.fraction:.1%}, KL {f.kl:.3g})"
        )

    def to_svg(self) -> str:
        """The circuit drawn over the model's nodes: layers bottom to top, edges coloured by input slot."""
        w, h, pad = 90, 80, 40
        cols = max((c for c, _ in self.layout.values()), default=0) + 1
        rows = max((r for _, r in self.layout.values()), default=0) + 1
        width, height = 2 * pad + cols * w, 2 * pad + rows * h

        def xy(name: str) -> tuple[float, float]:
            c, r = self.layout[name]
            return pad + c * w + w / 2, height - pad - r * h - h / 2

        colours = {"q": "#d62728", "k": "#2ca02c", "v": "#1f77b4"}
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
        ]
        used = set(self.nodes)
        for e in self.edges:
            left, right = e.split("->")
            slot = right.rsplit(".", 1)[1] if right.count(".") == 2 else "in"
            node = right.rsplit(".", 1)[0] if right.count(".") == 2 else right
            (x1, y1), (x2, y2) = xy(left), xy(node)
            score = self.scores.get(e)
            tip = html.escape(e + (f" ({score:.3g})" if score is not None else ""))
            parts.append(
                f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2 + 12:.0f}" stroke="{colours.get(slot, "#555")}" '
                f'stroke-width="2" opacity="0.8"><title>{tip}</title></line>'
            )
        for name in self.layout:
            x, y = xy(name)
            on = name in used
            parts.append(
                f'<rect x="{x - 30:.0f}" y="{y - 12:.0f}" width="60" height="24" rx="5" '
                f'fill="{"#fff3c4" if on else "#f4f4f4"}" stroke="{"#333" if on else "#ccc"}"/>'
                f'<text x="{x:.0f}" y="{y + 5:.0f}" text-anchor="middle" font-size="12" '
                f'fill="{"#000" if on else "#aaa"}">{html.escape(name)}</text>'
            )
        parts.append("</svg>")
        return "".join(parts)

    def plot(self):
        """The same picture as a Plotly figure (nodes and edges with hover text)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for e in self.edges:
            left, right = e.split("->")
            node = right.rsplit(".", 1)[0] if right.count(".") == 2 else right
            (c1, r1), (c2, r2) = self.layout[left], self.layout[node]
            fig.add_trace(
                go.Scatter(
                    x=[c1, c2],
                    y=[r1, r2],
                    mode="lines",
                    hoverinfo="text",
                    text=e,
                    line=dict(width=2),
                    showlegend=False,
                )
            )
        names = list(self.layout)
        fig.add_trace(
            go.Scatter(
                x=[self.layout[n][0] for n in names],
                y=[self.layout[n][1] for n in names],
                mode="markers+text",
                text=names,
                textposition="top center",
                showlegend=False,
            )
        )
        fig.update_layout(title=repr(self), template="plotly_white", xaxis_visible=False, yaxis_visible=False)
        return fig

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` of a circuit (`Kind.CIRCUIT`): ``method``, ``task``, ``edges`` (names),
        ``n_edges_total``, ``faithfulness`` (metric_full, metric_circuit, metric_corrupt, fraction, kl), ``scores``
        (edge -> score), ``details`` (the method's own numbers)."""
        return {
            "method": self.method,
            "task": self.task,
            "edges": list(self.edges),
            "n_edges_total": self.n_edges_total,
            "faithfulness": vars(self.faithfulness),
            "scores": self.scores,
            "details": self.details,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``report.html`` (picture, faithfulness, edge list) and then ``report.json`` (`Kind.CIRCUIT`,
        `to_dict`) into folder ``path`` (atomic)."""
        path = Path(path)
        f = self.faithfulness
        rows = "".join(
            f"<tr><td>{html.escape(e)}</td><td>{self.scores.get(e, float('nan')):.4g}</td></tr>"
            for e in self.edges
        )
        page = (
            f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(repr(self))}</title></head>'
            f'<body style="font-family:sans-serif"><h1>{html.escape(self.method)} circuit on {html.escape(self.task)}</h1>'
            f"<p>{len(self.edges)} of {self.n_edges_total} edges. Metric: full {f.metric_full:.4g}, circuit "
            f"{f.metric_circuit:.4g}, corrupted {f.metric_corrupt:.4g}; faithfulness {f.fraction:.1%}; "
            f"KL(full || circuit) {f.kl:.4g}.</p>{self.to_svg()}"
            f"<table border=1 cellpadding=4><tr><th>edge</th><th>score</th></tr>{rows}</table></body></html>"
        )
        atomic_write_text(path / "report.html", page)
        write_json(path / REPORT, Kind.CIRCUIT, self.to_dict())
        return path

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>{self.to_svg()}"

    def __str__(self) -> str:
        return json.dumps(self.to_dict()["faithfulness"])


def layout(graph: ComponentGraph) -> dict[str, tuple[int, int]]:
    """Columns and rows for pictures: embeddings at the bottom, one row per layer's heads and MLP, logits on top."""
    out: dict[str, tuple[int, int]] = {}
    cfg = graph.cfg
    for n in graph.nodes:
        out[n.name] = _place(n, cfg.n_layers, cfg.n_heads)
    return out


def _place(n: Node, n_layers: int, n_heads: int) -> tuple[int, int]:
    if n.kind is NodeKind.EMBED:
        return (0, 0)
    if n.kind is NodeKind.POS_EMBED:
        return (1, 0)
    if n.kind is NodeKind.HEAD:
        return (n.head, 1 + 2 * n.layer)  # type: ignore[return-value,operator]
    if n.kind is NodeKind.MLP:
        return (n_heads // 2, 2 + 2 * n.layer)  # type: ignore[operator]
    return (n_heads // 2, 1 + 2 * n_layers)
