"""MIB's circuit faithfulness metrics: the integrated circuit performance ratio (CPR) and the circuit-model
distance (CMD), from any method's `EdgeScores`.

For each circuit size ``k`` (a fraction of all edges; MIB's grid `MIB_FRACTIONS`) the circuit is the top
``int(k * n_edges)`` edges of the scores, pruned of what cannot matter (`prune`: repeatedly drop nodes with no
incoming or no outgoing circuit edge, and the edges touching them; the embeddings always count as fed, the
logits as read), and evaluated with the edge engine: every edge outside it carries its corrupted value, the
effects propagating (`interplab.circuits.circuit.circuit_spec`). Its normalised faithfulness is

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

with ``m`` the task's metric averaged over the examples (a ratio of means), ``m(full)`` the model on the clean
inputs and ``m(empty)`` the model with every edge corrupted. Areas use the trapezoid rule over the fractions
themselves (a linear axis: the 0.2-1 range carries 80% of the weight), as MIB does:

- CPR = area under f (higher is better; can exceed 1), from the curve ranked by signed score (importance:
  the edges estimated to help the task most come first);
- CMD = area under |1 - f| (0 is best), from the curve ranked by |score|.

Sources (read, paraphrased): MIB's circuit track (``hannamw/MIB-circuit-track``,
``MIB_circuit_track/evaluation.py``) and the EAP-IG library's ``Graph.apply_topn`` / ``Graph.prune``; Mueller
et al., "MIB: A Mechanistic Interpretability Benchmark", ICML 2025, arXiv 2504.13151.

>>> from interplab.circuits.eap import eap_ig
>>> from interplab.circuits.planted import induction_data, planted_induction
>>> model = planted_induction()
>>> tokens, labels, _ = induction_data(80)
>>> def metric(logits, rows):
...     return logits[:, -1].log_softmax(-1)[torch.arange(len(rows)), labels[rows]]
>>> task = DiscoveryTask(name="induction", tokens=tokens, clean=torch.arange(40), corrupt=torch.arange(40, 80),
...                      metric=metric)
>>> result = circuit_metrics(model, task, eap_ig(model, task))
>>> result.curves["absolute"].edges  # edges per MIB size after pruning (42 edges in all)
(0, 0, 0, 0, 0, 2, 3, 8, 21, 42)
>>> round(result.curves["absolute"].faithfulness[-1], 3), result.cmd < 0.2
(1.0, True)
>>> result.save("metrics").name  # metrics.json + metrics.html (the curve)
'metrics.json'
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from interplab.circuits.circuit import DiscoveryTask, circuit_spec
from interplab.circuits.eap import EdgeScores
from interplab.circuits.engine import EdgeEngine, Spec
from interplab.circuits.graph import Edge, NodeKind
from interplab.io import atomic_write_text
from interplab.model.transformer import Transformer
from interplab.plots import figure_html
from interplab.runs import METRICS_JSON, Kind, read_json, write_json

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""MIB's circuit sizes, as fractions of all edges"""

Ranking = Literal["signed", "absolute"]
RANKINGS: tuple[Ranking, ...] = ("signed", "absolute")


def prune(edges: Iterable[Edge]) -> set[Edge]:
    """MIB's pruning: repeatedly drop every node lacking an incoming or an outgoing circuit edge (embeddings
    always count as fed, the logits as read) and every edge touching a dropped node, until nothing changes.
    Dropped edges change nothing under patching: their sender only carries corrupted inputs, or nothing reads
    their receiver."""
    keep = set(edges)
    inputs = (NodeKind.EMBED, NodeKind.POS_EMBED)
    while True:
        fed = {e.receiver for e in keep}
        read = {e.sender for e in keep}
        alive = {
            n
            for n in fed | read
            if (n.kind in inputs or n in fed) and (n.kind is NodeKind.LOGITS or n in read)
        }
        kept = {e for e in keep if e.sender in alive and e.receiver in alive}
        if kept == keep:
            return keep
        keep = kept


def top_edges(
    scores: EdgeScores, fraction: float, *, ranking: Ranking = "absolute", pruned: bool = True
) -> set[Edge]:
    """The circuit of size ``fraction``: the top ``int(fraction * n_edges)`` edges (``ranking``: by
    importance, or by ``|score|``), then `prune`d unless ``pruned=False``."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"a circuit size is a fraction of the edges in [0, 1], got {fraction}")
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; valid: {', '.join(RANKINGS)}")
    # int(fraction * n) exactly as MIB computes it (so 0.29 * 100 = 28.999... gives 28 edges there and here)
    keep = scores.top(int(fraction * len(scores.edges)), absolute=ranking == "absolute")
    return prune(keep) if pruned else keep


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """The trapezoid-rule area of ``values`` over ``fractions`` (a linear axis)."""
    if len(fractions) != len(values):
        raise ValueError(f"{len(fractions)} fractions but {len(values)} values")
    return sum(
        (fractions[i + 1] - fractions[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(fractions) - 1)
    )


@dataclass(frozen=True)
class FaithfulnessCurve:
    """f at each circuit size, for one ranking of the edges."""

    ranking: Ranking
    fractions: tuple[float, ...]
    requested: tuple[int, ...]
    """``int(fraction * n_edges)``: the edges taken before pruning"""
    edges: tuple[int, ...]
    """edges in each circuit after pruning"""
    metric: tuple[float, ...]
    """m(C) of each circuit"""
    faithfulness: tuple[float, ...]
    """f(C) = (m(C) - m(empty)) / (m(full) - m(empty))"""

    @property
    def area(self) -> float:
        """The area under f (CPR when the ranking is signed)."""
        return area(self.fractions, self.faithfulness)

    @property
    def area_from_1(self) -> float:
        """The area under |1 - f| (CMD when the ranking is absolute)."""
        return area(self.fractions, [abs(1 - f) for f in self.faithfulness])

    @property
    def average(self) -> float:
        return sum(self.faithfulness) / len(self.faithfulness)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranking": self.ranking,
            "fractions": list(self.fractions),
            "requested": list(self.requested),
            "edges": list(self.edges),
            "metric": list(self.metric),
            "faithfulness": list(self.faithfulness),
            "area": self.area,
            "area_from_1": self.area_from_1,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaithfulnessCurve:
        return cls(
            ranking=d["ranking"],
            fractions=tuple(d["fractions"]),
            requested=tuple(d["requested"]),
            edges=tuple(d["edges"]),
            metric=tuple(d["metric"]),
            faithfulness=tuple(d["faithfulness"]),
        )


@dataclass(frozen=True)
class CircuitMetrics:
    """MIB's CPR and CMD of one method's scores on one task, with the curves they integrate."""

    method: str
    task: str
    n_edges_total: int
    metric_full: float
    metric_empty: float
    curves: dict[str, FaithfulnessCurve]
    """by ranking: ``signed`` and/or ``absolute``"""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def cpr(self) -> float:
        """Integrated circuit performance ratio: the area under f of the signed ranking (else the only one)."""
        return self.curves.get("signed", next(iter(self.curves.values()))).area

    @property
    def cmd(self) -> float:
        """Circuit-model distance: the area under |1 - f| of the absolute ranking (else the only one)."""
        return self.curves.get("absolute", next(iter(self.curves.values()))).area_from_1

    def __repr__(self) -> str:
        return (
            f"CircuitMetrics({self.method} on {self.task}: CPR {self.cpr:.3f}, CMD {self.cmd:.3f}, "
            f"{self.n_edges_total} edges, {len(next(iter(self.curves.values())).fractions)} sizes)"
        )

    def plot(self):
        """f against the circuit size (log axis; the areas are on a linear one), one line per ranking, with
        f = 1 (the full model) and f = 0 (every edge corrupted) as guides."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, c in self.curves.items():
            fig.add_trace(
                go.Scatter(
                    x=list(c.fractions),
                    y=list(c.faithfulness),
                    mode="lines+markers",
                    name=f"{name} ranking",
                    text=[
                        f"{n} edges ({r} before pruning)" for n, r in zip(c.edges, c.requested, strict=True)
                    ],
                    hovertemplate="%{x:.3g} of edges, f = %{y:.3f}<br>%{text}<extra></extra>",
                )
            )
        for y, label in ((1.0, "full model"), (0.0, "all edges corrupted")):
            fig.add_hline(y=y, line_dash="dot", line_color="#888", annotation_text=label)
        fig.update_layout(
            title=f"{self.method} on {self.task}: CPR {self.cpr:.3f}, CMD {self.cmd:.3f}",
            xaxis=dict(type="log", title="circuit size (fraction of edges)"),
            yaxis_title="normalised faithfulness f",
            template="plotly_white",
        )
        return fig

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.json`` document (`Kind.CIRCUIT_METRICS`): ``method``, ``task``, ``n_edges_total``,
        ``metric_full``, ``metric_empty``, ``cpr``, ``cmd``, ``curves`` (by ranking: fractions, requested and
        pruned edge counts, metric, faithfulness, areas), ``details``."""
        return {
            "method": self.method,
            "task": self.task,
            "n_edges_total": self.n_edges_total,
            "metric_full": self.metric_full,
            "metric_empty": self.metric_empty,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "curves": {k: c.to_dict() for k, c in self.curves.items()},
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CircuitMetrics:
        return cls(
            method=d["method"],
            task=d["task"],
            n_edges_total=d["n_edges_total"],
            metric_full=d["metric_full"],
            metric_empty=d["metric_empty"],
            curves={k: FaithfulnessCurve.from_dict(c) for k, c in d["curves"].items()},
            details=d.get("details", {}),
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``metrics.html`` (the curve) and then ``metrics.json`` (`to_dict`) into ``folder``; returns
        the JSON's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "metrics.html", figure_html(self.plot(), folder))
        return write_json(folder / METRICS_JSON, Kind.CIRCUIT_METRICS, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CircuitMetrics:
        """The inverse of `save`: ``path`` is the folder or its ``metrics.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / METRICS_JSON
        return cls.from_dict(read_json(path, Kind.CIRCUIT_METRICS, strip=True))

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{c.area:.3f}</td><td>{c.area_from_1:.3f}</td></tr>"
            for name, c in self.curves.items()
        )
        return (
            f"<p>{html.escape(repr(self))}</p><table><tr><th>ranking</th><th>area under f</th>"
            f"<th>area under |1 - f|</th></tr>{rows}</table>"
        )


def circuit_metrics(
    model: Transformer,
    task: DiscoveryTask,
    scores: EdgeScores,
    *,
    fractions: Sequence[float] = MIB_FRACTIONS,
    rankings: Sequence[Ranking] = RANKINGS,
    pruned: bool = True,
    engine: EdgeEngine | None = None,
) -> CircuitMetrics:
    """CPR and CMD of ``scores`` on ``task``: see the module docstring. ``fractions`` ascending in (0, 1];
    ``rankings``: which curves to compute (CPR reads the signed one, CMD the absolute one)."""
    engine = engine or task.engine(model)
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
        raise ValueError(f"fractions must be distinct, ascending and in (0, 1], got {list(fractions)}")
    if not rankings or any(r not in RANKINGS for r in rankings):
        raise ValueError(f"rankings must be some of {', '.join(RANKINGS)}, got {list(rankings)}")
    if tuple(scores.edges) != tuple(engine.graph.edges):
        raise ValueError("the scores are of another graph's edges than the engine's model")
    n = len(engine.graph.edges)
    evaluated: dict[frozenset[Edge], float] = {}

    def metric(keep: set[Edge]) -> float:
        key = frozenset(keep)
        if key not in evaluated:
            spec = Spec(task.clean) if len(keep) == n else circuit_spec(engine, task, keep)
            evaluated[key] = float(task.metric(engine.run(spec), task.clean).mean())
        return evaluated[key]

    full, empty = metric(set(engine.graph.edges)), metric(set())
    denom = full - empty
    curves: dict[str, FaithfulnessCurve] = {}
    for ranking in dict.fromkeys(rankings):
        requested, sizes, values, fs = [], [], [], []
        for frac in fractions:
            unpruned = top_edges(scores, frac, ranking=ranking, pruned=False)
            keep = prune(unpruned) if pruned else unpruned
            m = metric(keep)
            requested.append(len(unpruned))
            sizes.append(len(keep))
            values.append(m)
            fs.append((m - empty) / denom if denom != 0 else float("nan"))
        curves[ranking] = FaithfulnessCurve(
            ranking, fractions, tuple(requested), tuple(sizes), tuple(values), tuple(fs)
        )
    return CircuitMetrics(
        method=scores.method,
        task=task.name,
        n_edges_total=n,
        metric_full=full,
        metric_empty=empty,
        curves=curves,
        details={"pruned": pruned, "circuit_runs": len(evaluated), "scores": scores.details},
    )


__all__ = [
    "MIB_FRACTIONS",
    "CircuitMetrics",
    "FaithfulnessCurve",
    "area",
    "circuit_metrics",
    "prune",
    "top_edges",
]
