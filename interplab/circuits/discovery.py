"""Automatic circuit discovery: ACDC here; edge attribution (EAP, EAP-IG) lives in `interplab.circuits.eap`
and is re-exported (``from interplab.circuits.discovery import eap`` keeps working).

- `eap` (Syed, Rager, Conmy 2023) scores every edge at once with a first-order estimate of the metric change
  when the edge is corrupted; `eap_ig` averages that gradient along a path from the corrupted to the clean
  input (Hanna et al. 2024); see `interplab.circuits.eap`.
- `acdc` (Conmy et al. 2023) visits receivers from the output backwards and removes (corrupts) each incoming
  edge whose removal raises KL(full model || current circuit) by less than ``threshold``; removals are kept.

Both return a `Circuit` with its faithfulness: the metric of the model with every edge outside the circuit
patched from the corrupted inputs, relative to the full and the fully corrupted model.
"""

from __future__ import annotations

from collections.abc import Callable

from interplab.circuits.circuit import Circuit, DiscoveryTask, circuit_spec, faithfulness, kl_from, layout
from interplab.circuits.eap import (
    Attribution,
    EdgeScores,
    ScoreSign,
    attribute,
    clean_corrupted,
    eap,
    eap_circuit,
    eap_ig,
    scores_circuit,
)
from interplab.circuits.engine import Ablation, EdgeEngine, Spec
from interplab.circuits.graph import Edge
from interplab.model.transformer import Transformer


def acdc(
    model: Transformer,
    task: DiscoveryTask,
    threshold: float = 0.05,
    *,
    engine: EdgeEngine | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Circuit:
    """ACDC with the KL divergence to the full model; see the module docstring."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    engine = engine or task.engine(model)
    graph = engine.graph
    value = task.corrupt_value()
    full = engine.run(Spec(task.clean))
    removed: dict[Edge, Spec | Ablation] = {}
    current = 0.0
    changes: dict[str, float] = {}
    order = [(r, s) for r in reversed(graph.nodes) for s in r.slots]
    total, done = len(graph.edges), 0
    for receiver, slot in order:
        for edge in reversed(graph.edges_into(receiver, slot)):
            trial = {**removed, edge: value}
            kl = float(kl_from(full, engine.run(Spec(task.clean, trial, propagate=True)), task.position))
            changes[edge.name] = kl - current
            if kl - current < threshold:
                removed, current = trial, kl
            done += 1
            if progress is not None:
                progress(done, total)
    keep = {e for e in graph.edges if e not in removed}
    keep = _connected(graph, keep)
    return Circuit(
        edges=tuple(e.name for e in graph.edges if e in keep),
        method="acdc",
        task=task.name,
        faithfulness=faithfulness(engine, task, keep),
        n_edges_total=len(graph.edges),
        scores=changes,
        layout=layout(graph),
        details={"threshold": threshold, "kl_final": current, "patched_runs": total},
    )


def _connected(graph, keep: set[Edge]) -> set[Edge]:
    """Drop kept edges that cannot reach the logits through kept edges (they change nothing)."""
    reach = {graph.logits}
    for node in reversed(graph.nodes):
        if node in reach:
            continue
        if any(e.sender == node and e.receiver in reach for e in keep):
            reach.add(node)
    return {e for e in keep if e.receiver in reach}


__all__ = [
    "Attribution",
    "EdgeScores",
    "ScoreSign",
    "acdc",
    "attribute",
    "circuit_spec",
    "clean_corrupted",
    "eap",
    "eap_circuit",
    "eap_ig",
    "scores_circuit",
]
