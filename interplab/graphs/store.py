"""An attribution graph's run folder (kind ``attribution_graph``): ``graph.safetensors`` (the unpruned
adjacency, the nodes as arrays, the targets' read-out vectors), ``graph.json`` (Neuronpedia's graph JSON of
the pruned graph, `interplab.graphs.export`) and ``report.json`` (scores, sizes, targets, settings, where the
model and CLT were). `load_graph` is the exact inverse of `save_graph` for the graph."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from interplab import runs
from interplab.graphs.export import to_neuronpedia_json
from interplab.graphs.nodes import Node, NodeKind, Target
from interplab.graphs.prune import PrunedGraph, graph_scores, prune_graph
from interplab.io import atomic_write_json, load_tensors, save_tensors

if TYPE_CHECKING:
    from interplab.graphs.attribution import AttributionGraph

_KIND_CODES = list(NodeKind)


def save_graph(
    graph: AttributionGraph, path: str | Path, pruned: PrunedGraph | None = None, *, slug: str | None = None
) -> Path:
    """Write ``graph`` (and its pruned JSON: ``pruned`` or `prune_graph`'s defaults) into the folder ``path``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    pruned = pruned if pruned is not None else prune_graph(graph)
    none = -1
    tensors = {
        "adjacency": graph.adjacency.detach().float().contiguous(),
        "tokens": graph.tokens.long(),
        "node_kind": torch.tensor([_KIND_CODES.index(n.kind) for n in graph.nodes], dtype=torch.long),
        "node_layer": torch.tensor(
            [none if n.layer is None else n.layer for n in graph.nodes], dtype=torch.long
        ),
        "node_position": torch.tensor([n.position for n in graph.nodes], dtype=torch.long),
        "node_feature": torch.tensor(
            [none if n.feature is None else n.feature for n in graph.nodes], dtype=torch.long
        ),
        "node_value": torch.tensor(
            [math.nan if n.value is None else n.value for n in graph.nodes], dtype=torch.float64
        ),
        "target_vectors": torch.stack([t.vector.detach().float().cpu() for t in graph.targets]),
        "node_mask": pruned.node_mask,
        "edge_mask": pruned.edge_mask,
    }
    save_tensors(folder / runs.GRAPH_TENSORS, tensors)
    links = {k: graph.meta.get(k) for k in ("run", "clt", "feature_db")}
    doc = to_neuronpedia_json(graph, pruned, slug=slug or folder.name, links=links)
    graph_json = folder / runs.GRAPH_JSON
    if graph_json.is_file():  # keep what the viewer saved (pins, supernodes) on a rebuild of the same graph
        try:
            old = runs.read_json(graph_json)
            doc["qParams"] = {**doc["qParams"], **dict(old.get("qParams", {}))}
        except (runs.RunError, ValueError, AttributeError):
            pass
    atomic_write_json(graph_json, doc)
    scores = graph_scores(graph)
    report: dict[str, Any] = {
        "scores": scores,
        "n_layers": graph.n_layers,
        "n_tokens": graph.n_pos,
        "n_features": graph.n_features,
        "n_nodes": len(graph.nodes),
        "pruned": {
            "node_threshold": pruned.node_threshold,
            "edge_threshold": pruned.edge_threshold,
            "n_nodes": pruned.n_nodes,
            "n_edges": pruned.n_edges,
        },
        "targets": [
            {"label": t.label, "token": t.token, "token_b": t.token_b, "weight": t.weight, "text": t.text}
            for t in graph.targets
        ],
        "tokens": graph.tokens.tolist(),
        "token_strings": graph.token_strings,
        "meta": graph.meta,
    }
    runs.write_json(folder / runs.REPORT, runs.Kind.ATTRIBUTION_GRAPH, report)
    return folder


@dataclass(frozen=True)
class GraphParts:
    """What `read_graph` reads: the fields of an `AttributionGraph`."""

    nodes: list[Node]
    adjacency: Tensor
    tokens: Tensor
    n_layers: int
    targets: list[Target]
    token_strings: list[str] | None
    meta: dict[str, Any]


def read_graph(path: str | Path) -> GraphParts:
    """The parts of the graph `save_graph` wrote into ``path`` (a clear error for a folder that is not one):
    ``AttributionGraph.load`` builds the graph from them."""
    run = runs.GraphRun.open(path)
    t = load_tensors(run.tensors)
    report = run.report
    nodes = []
    for kind, layer, pos, feat, value in zip(
        t["node_kind"].tolist(),
        t["node_layer"].tolist(),
        t["node_position"].tolist(),
        t["node_feature"].tolist(),
        t["node_value"].tolist(),
        strict=True,
    ):
        nodes.append(
            Node(
                _KIND_CODES[kind],
                None if layer < 0 else layer,
                pos,
                None if feat < 0 and _KIND_CODES[kind] is NodeKind.ERROR else feat,
                None if math.isnan(value) else value,
            )
        )
    targets = [
        Target(r["label"], r["token"], r["weight"], vec, token_b=r["token_b"], text=r.get("text", ""))
        for r, vec in zip(report["targets"], t["target_vectors"], strict=True)
    ]
    return GraphParts(
        nodes,
        t["adjacency"],
        t["tokens"],
        report["n_layers"],
        targets,
        report.get("token_strings"),
        report["meta"],
    )


def read_masks(path: str | Path) -> tuple[Tensor, Tensor, float, float]:
    """The node and edge masks a graph folder's graph.json was pruned with, and the two thresholds."""
    run = runs.GraphRun.open(path)
    t = load_tensors(run.tensors)
    report = run.report["pruned"]
    return t["node_mask"], t["edge_mask"], report["node_threshold"], report["edge_threshold"]
