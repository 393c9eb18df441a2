"""A static picture of an attribution graph: nodes laid out by position (x) and layer (y; embeddings at the
bottom, logits at the top), the kept edges drawn with width by weight and colour by sign. The interactive viewer
is the web app's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from interplab.graphs.nodes import NodeKind
from interplab.graphs.prune import PrunedGraph, prune_graph

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from interplab.graphs.attribution import AttributionGraph

_COLOURS = {
    NodeKind.FEATURE: "#4c78a8",
    NodeKind.ERROR: "#9d9d9d",
    NodeKind.EMBEDDING: "#54a24b",
    NodeKind.LOGIT: "#e45756",
}


def _place(graph: AttributionGraph, i: int) -> tuple[float, float]:
    node = graph.nodes[i]
    if node.kind is NodeKind.EMBEDDING:
        return float(node.position), -1.0
    if node.kind is NodeKind.LOGIT:
        return float(node.position) + 0.15 * (i - graph.logit_slice.start), float(graph.n_layers)
    assert node.layer is not None
    return float(node.position), float(node.layer)


def graph_figure(graph: AttributionGraph, pruned: PrunedGraph | None = None) -> go.Figure:
    import plotly.graph_objects as go

    pruned = pruned if pruned is not None else prune_graph(graph)
    kept = [int(i) for i in pruned.node_mask.nonzero().flatten()]
    # spread the nodes sharing a (position, layer) cell
    cells: dict[tuple[float, float], list[int]] = {}
    for i in kept:
        cells.setdefault(_place(graph, i), []).append(i)
    xy: dict[int, tuple[float, float]] = {}
    for (x, y), members in cells.items():
        for k, i in enumerate(members):
            xy[i] = (x + (k - (len(members) - 1) / 2) * 0.6 / max(len(members), 1), y)
    edges = pruned.edge_mask.nonzero().tolist()
    weights = [float(graph.adjacency[d, s]) for d, s in edges]
    top = max((abs(w) for w in weights), default=1.0) or 1.0
    traces: list[Any] = []
    for (dst, src), w in zip(edges, weights, strict=True):
        if src not in xy or dst not in xy:
            continue
        traces.append(
            go.Scatter(
                x=[xy[src][0], xy[dst][0]],
                y=[xy[src][1], xy[dst][1]],
                mode="lines",
                line={"width": 0.5 + 4 * abs(w) / top, "color": "#b2182b" if w > 0 else "#2166ac"},
                opacity=0.6,
                hoverinfo="text",
                text=f"{w:+.3g}",
                showlegend=False,
            )
        )
    ids = graph.node_ids()
    for kind, colour in _COLOURS.items():
        members = [i for i in kept if graph.nodes[i].kind is kind]
        if not members:
            continue
        labels = []
        for i in members:
            node = graph.nodes[i]
            extra = f" = {node.value:.3g}" if node.value is not None else ""
            labels.append(f"{kind.value} {ids[i]}{extra}")
        traces.append(
            go.Scatter(
                x=[xy[i][0] for i in members],
                y=[xy[i][1] for i in members],
                mode="markers",
                marker={"size": 10, "color": colour},
                name=kind.value,
                text=labels,
                hoverinfo="text",
            )
        )
    strings = graph.token_strings or [str(int(t)) for t in graph.tokens]
    fig = go.Figure(traces)
    fig.update_layout(
        template="plotly_white",
        title=f"attribution graph: {pruned.n_nodes} nodes, {pruned.n_edges} edges",
        xaxis={
            "tickmode": "array",
            "tickvals": list(range(graph.n_pos)),
            "ticktext": strings,
            "title": "position",
        },
        yaxis={
            "tickmode": "array",
            "tickvals": [-1, *range(graph.n_layers), graph.n_layers],
            "ticktext": ["emb", *[f"L{layer}" for layer in range(graph.n_layers)], "logit"],
            "title": "layer",
        },
    )
    return fig
