"""circuit-tracer / Neuronpedia's graph JSON (what circuit-tracer 0.5's ``create_graph_files`` writes and
Neuronpedia's viewer opens), and its reader.

The document: ``metadata`` (slug, scan, prompt tokens, node threshold, schema version 1), ``qParams`` (pinned
node ids and supernodes ``[[label, node_id, ...], ...]``, which the web app saves back), ``nodes`` (the pruned
graph's nodes that have a kept edge, plus every embedding and logit node) and ``links`` (every kept edge,
``{source, target, weight}`` with the raw signed weight, in row-major (target, source) order). Beyond
Neuronpedia's fields it carries ``interplab: {run, clt, feature_db}`` so interplab's viewer can link nodes to
feature pages. Error nodes are ``{layer}_-1_{pos}`` (circuit-tracer's fix of the 0.5 id ``0_{layer}_{pos}``,
which collides with a layer-0 feature's).

>>> from interplab.graphs import attribute
>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> graph = attribute(model, clt, tokens[0], targets=3)
>>> doc = to_neuronpedia_json(graph, prune_graph(graph), slug="example")
>>> from_neuronpedia_json(doc).metadata["slug"]
'example'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from interplab.graphs.nodes import NodeKind
from interplab.graphs.prune import PrunedGraph, prune_graph

if TYPE_CHECKING:
    from interplab.graphs.attribution import AttributionGraph

SCHEMA_VERSION = 1
FEATURE_TYPES = {
    NodeKind.FEATURE: "cross layer transcoder",
    NodeKind.ERROR: "mlp reconstruction error",
    NodeKind.EMBEDDING: "embedding",
    NodeKind.LOGIT: "logit",
}


def cantor(layer: int, feature: int) -> int:
    """Neuronpedia's one-number feature id of (layer, feature)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def to_neuronpedia_json(
    graph: AttributionGraph,
    pruned: PrunedGraph | None = None,
    *,
    slug: str = "graph",
    scan: str | None = None,
    links: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The graph JSON of ``graph`` pruned by ``pruned`` (default: `prune_graph`'s thresholds). ``links``: the
    ``interplab`` block (run, clt, feature_db paths)."""
    pruned = pruned if pruned is not None else prune_graph(graph)
    n_layers = graph.n_layers
    ids = graph.node_ids()
    strings = graph.token_strings or [str(int(t)) for t in graph.tokens]
    kept = [int(i) for i in pruned.node_mask.nonzero().flatten()]
    edges = pruned.edge_mask.nonzero().tolist()
    kept_set = set(kept)
    link_rows = [
        {"source": ids[src], "target": ids[dst], "weight": float(graph.adjacency[dst, src])}
        for dst, src in edges
        if src in kept_set and dst in kept_set
    ]
    connected = {row["source"] for row in link_rows} | {row["target"] for row in link_rows}
    nodes = []
    first_logit = graph.logit_slice.start
    for i in kept:
        node = graph.nodes[i]
        if node.kind in (NodeKind.FEATURE, NodeKind.ERROR) and ids[i] not in connected:
            continue
        influence: float | None = float(pruned.cumulative_influence[i])
        row: dict[str, Any] = {
            "node_id": ids[i],
            "feature": 0,
            "layer": "",
            "ctx_idx": node.position,
            "feature_type": FEATURE_TYPES[node.kind],
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "",
            "clerp": "",
            "influence": influence,
            "activation": None,
        }
        if node.kind is NodeKind.FEATURE:
            assert node.layer is not None and node.feature is not None
            row.update(
                feature=cantor(node.layer, node.feature),
                layer=str(node.layer),
                jsNodeId=f"{node.layer}_{node.feature}-0",
                activation=node.value,
            )
        elif node.kind is NodeKind.ERROR:
            row.update(feature=-1, layer=str(node.layer), jsNodeId=f"{node.layer}_{node.position}-0")
        elif node.kind is NodeKind.EMBEDDING:
            row.update(feature=node.position, layer="E", jsNodeId=f"E_{node.feature}-{node.position}")
        else:
            target = graph.targets[i - first_logit]
            prob = float(target.weight)
            row.update(
                feature=node.feature,
                layer=str(n_layers + 1),
                jsNodeId=f"L_{node.feature}-{node.position}",
                token_prob=prob,
                is_target_logit=i == first_logit,
                clerp=f'Output "{target.text}" (p={prob:.3f})',
                influence=None,
            )
        nodes.append(row)
    return {
        "metadata": {
            "slug": slug,
            "scan": scan or slug,
            "transcoder_list": [],
            "prompt_tokens": strings,
            "prompt": "".join(strings),
            "node_threshold": pruned.node_threshold,
            "schema_version": SCHEMA_VERSION,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": link_rows,
        "interplab": {"run": None, "clt": None, "feature_db": None, **(links or {})},
    }


@dataclass(frozen=True)
class JSONNode:
    """A node of a graph JSON, parsed: its kind, layer (None for embeddings and logits), position and
    feature (the latent; the token id of embeddings and logits; None for errors)."""

    node_id: str
    kind: NodeKind
    layer: int | None
    position: int
    feature: int | None
    activation: float | None
    influence: float | None
    token_prob: float


@dataclass(frozen=True)
class GraphJSON:
    """A graph JSON read back (`from_neuronpedia_json`)."""

    metadata: dict[str, Any]
    q_params: dict[str, Any]
    nodes: list[JSONNode]
    links: list[tuple[str, str, float]]
    """(source, target, weight)"""
    interplab: dict[str, Any] = field(default_factory=dict)

    @property
    def supernodes(self) -> list[tuple[str, list[str]]]:
        """(label, node ids) of each supernode."""
        return [(group[0], list(group[1:])) for group in self.q_params.get("supernodes", []) if group]

    @property
    def pinned(self) -> list[str]:
        return list(self.q_params.get("pinnedIds", []))


_KINDS = {v: k for k, v in FEATURE_TYPES.items()}


def from_neuronpedia_json(data: dict[str, Any]) -> GraphJSON:
    """Read a graph JSON (interplab's or circuit-tracer's: a 0.5 error id ``0_{layer}_{pos}`` is read by its
    ``feature_type``); a clear error for a document that is not one."""
    missing = [k for k in ("metadata", "nodes", "links") if k not in data]
    if missing:
        raise ValueError(
            f"not a Neuronpedia graph JSON: it has no {', '.join(missing)} (keys: {sorted(data)})"
        )
    nodes = []
    for row in data["nodes"]:
        kind = _KINDS.get(row.get("feature_type", ""))
        if kind is None:
            kind = (
                NodeKind.FEATURE
                if str(row.get("feature_type", "")).lower() in ("clt", "transcoder")
                else None
            )
        if kind is None:
            raise ValueError(
                f"node {row.get('node_id')!r} has an unknown feature_type {row.get('feature_type')!r}"
            )
        parts = str(row["node_id"]).split("_")
        pos = int(row["ctx_idx"])
        if kind is NodeKind.FEATURE:
            layer, feature = int(parts[0]), int(parts[1])
        elif kind is NodeKind.ERROR:
            layer, feature = int(row["layer"]), None
        else:
            layer, feature = None, int(parts[1])
        nodes.append(
            JSONNode(
                node_id=str(row["node_id"]),
                kind=kind,
                layer=layer,
                position=pos,
                feature=feature,
                activation=row.get("activation"),
                influence=row.get("influence"),
                token_prob=float(row.get("token_prob", 0.0)),
            )
        )
    links = [(str(r["source"]), str(r["target"]), float(r["weight"])) for r in data["links"]]
    return GraphJSON(
        dict(data["metadata"]), dict(data.get("qParams", {})), nodes, links, dict(data.get("interplab", {}))
    )
