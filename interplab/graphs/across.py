"""Attribution graphs across training (issue 17, item 6): the graph of one prompt at several checkpoints of a
training run, each with the CLT trained on that checkpoint (`interplab clt train --checkpoints`), and what
changed between them, beside the run's formation scores.

Features of CLTs trained on different checkpoints have unrelated indices, so a feature is followed across
checkpoints by its decoder: latent ``j`` of layer ``l`` in the later CLT continues latent ``i`` of layer ``l`` in
the earlier one when each is the other's nearest (mutual best) by the cosine of their decoders (all the MLP
outputs a latent writes, concatenated) and the cosine is at least ``match_threshold``. A chain of such matches
is a *track*, named by where it starts: ``{feature}@{step}``. Every node has an identity that is stable across
checkpoints: a feature ``{layer}_{track}_{pos}`` (``0_118@300_5``: layer 0, the track that starts as feature 118
of step 300's CLT, position 5), an error ``{layer}_-1_{pos}``, a token ``E_{token}_{pos}``, a logit
``{n_layers + 1}_{token}_{pos}`` (Neuronpedia's ids, the feature index replaced by its track); an edge is
``source -> target``. Between consecutive checkpoints the pruned graphs' nodes and edges *appear* or *vanish*
by identity; edges in both are listed by how much their weight *changed*. Each checkpoint also gets the share
of the targets' influence that enters at each prompt position (tokens and errors: where in the prompt the
prediction comes from), and the formation report's induction and previous-token scores at its step.

With one CLT shared by every checkpoint (`interplab.sae.clt_shared.train_clt_shared`; ``graphs_across(...,
clt="shared")``; the same CLT object handed to `compare_graphs` for every step) no matching is needed: a
feature's identity is its Neuronpedia id ``{layer}_{feature}_{pos}``, the same dictionary direction at every
checkpoint, and what appears or vanishes is literally that feature's node or edge. ``GraphsAcross.fit`` then
says how much worse the shared dictionary fits each checkpoint than that checkpoint's own CLT (FVU, the
replacement model's KL, the graphs' replacement and completeness scores).

>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> from interplab.graphs import attribute, prune_graph
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> graph = attribute(model, clt, tokens[0], targets=[3])
>>> across = compare_graphs([10, 20], [graph, graph], [prune_graph(graph)] * 2, [clt, clt])
>>> across.counts[0]["nodes_appeared"], across.counts[0]["edges_vanished"]  # the same graph twice
(0, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from interplab import runs
from interplab.analysis.formation import FormationResult
from interplab.graphs.attribution import AttributionGraph, Targets, attribute
from interplab.graphs.nodes import NodeKind
from interplab.graphs.prune import PrunedGraph, graph_scores, influence, normalize_rows, prune_graph
from interplab.graphs.qk import QKAttribution, qk_attribution
from interplab.graphs.shared import fit_markdown, fit_row, shared_clt
from interplab.io import atomic_write_text
from interplab.model.load import load_model
from interplab.plots import write_figure_files
from interplab.runs.openers import CLTTrainRun
from interplab.sae.clt import CrossLayerTranscoder, check_fits, load_clt

if TYPE_CHECKING:
    import plotly.graph_objects as go

MATCH_THRESHOLD = 0.7
"""decoder cosine at or above which two mutually nearest latents of consecutive CLTs are one feature"""
N_CHANGED = 20
"""edges kept in both graphs of a pair, listed by how much their weight changed (the largest changes)"""
MAX_LISTED = 500
"""appeared or vanished nodes and edges listed per pair (the most influential; `counts` has every one)"""
QK_TOP = 5
"""(query node, key node) pairs of the QK attribution listed per checkpoint (the largest parts)"""


# ---- following features across CLTs -----------------------------------------------------------------
def _directions(clt: CrossLayerTranscoder, layer: int) -> Tensor:
    """[d_sae, n_out * d_model] each latent's concatenated decoder, unit norm (zero rows stay zero)."""
    w = clt.W_dec[layer].detach().double().flatten(1)
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def match_features(
    before: CrossLayerTranscoder, after: CrossLayerTranscoder, threshold: float = MATCH_THRESHOLD
) -> list[Tensor]:
    """Per layer, [d_sae of ``after``]: the latent of ``before`` that each latent of ``after`` continues (mutual
    best decoder cosine >= ``threshold``), or -1. The two CLTs must have the same layers and width of model.

    >>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
    >>> a = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, d_sae=4))
    >>> [m.tolist() for m in match_features(a, a)]
    [[0, 1, 2, 3], [0, 1, 2, 3]]
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"match_threshold must be a cosine in [-1, 1], got {threshold}")
    ca, cb = before.cfg, after.cfg
    if (ca.n_layers, ca.d_model, ca.cross_layer) != (cb.n_layers, cb.d_model, cb.cross_layer):
        raise ValueError(
            f"cannot follow features between a CLT of {ca.n_layers} layers x d_model {ca.d_model} "
            f"({'cross-layer' if ca.cross_layer else 'per-layer'}) and one of {cb.n_layers} x {cb.d_model} "
            f"({'cross-layer' if cb.cross_layer else 'per-layer'}): train them with the same recipe"
        )
    out = []
    for layer in range(ca.n_layers):
        cos = _directions(after, layer) @ _directions(before, layer).T  # [after, before]
        best_before = cos.argmax(dim=1)
        best_after = cos.argmax(dim=0)
        ok = (best_after[best_before] == torch.arange(len(best_before))) & (
            cos.gather(1, best_before[:, None])[:, 0] >= threshold
        )
        out.append(torch.where(ok, best_before, torch.full_like(best_before, -1)))
    return out


def _tracks(
    clts: Sequence[CrossLayerTranscoder], threshold: float
) -> tuple[list[list[tuple[Tensor, Tensor]]], list[list[int]]]:
    """Per checkpoint and layer: (the index of the checkpoint where each latent's track starts, the latent
    there); and per consecutive pair, the matched latents per layer."""
    first = clts[0]
    tracks = [
        [(torch.zeros(first.cfg.d_sae, dtype=torch.long), torch.arange(first.cfg.d_sae)) for _ in first.W_dec]
    ]
    matched = []
    for i in range(1, len(clts)):
        if clts[i] is clts[i - 1]:
            maps = [torch.arange(clts[i].cfg.d_sae) for _ in clts[i].W_dec]
        else:
            maps = match_features(clts[i - 1], clts[i], threshold)
        layers = []
        for layer, m in enumerate(maps):
            start, feat = tracks[i - 1][layer]
            here = torch.arange(len(m))
            continued = m >= 0
            safe = m.clamp(min=0)
            layers.append(
                (
                    torch.where(continued, start[safe], torch.full_like(m, i)),
                    torch.where(continued, feat[safe], here),
                )
            )
        tracks.append(layers)
        matched.append([int((m >= 0).sum()) for m in maps])
    return tracks, matched


# ---- the result -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphStep:
    """One checkpoint's graph, in short."""

    step: int
    folder: str | None
    """the graph's run folder (None when it was not saved)"""
    n_features: int
    """active features (nodes of the unpruned graph)"""
    n_kept_features: int
    """features the pruning kept"""
    n_nodes: int
    """nodes the pruning kept (tokens and logits included)"""
    n_edges: int
    replacement: float
    completeness: float
    target_probability: list[float]
    """each target's probability at this checkpoint (1 for a logit difference)"""
    position_influence: list[float]
    """per prompt position: its share of the influence that enters the graph (token embeddings and errors)"""
    induction: float | None = None
    """the formation report's best induction score at this step (None: no report, or not at this step)"""
    prev_token: float | None = None
    """the formation report's best previous-token score at this step"""
    qk: dict[str, Any] | None = None
    """the QK attribution of the chosen attention edge at this step (`graphs_across(qk=...)`): layer, head,
    query_pos, key_pos, score, gate, current / through_previous (the parts through the key position's own
    raw key and, smeared keys, the previous one's), by_kind (the score summed by query-side kind x key-side
    kind x route, e.g. ``"token x token, previous"``; a constant as ``const``, e.g. ``"const x token, own"``)
    and top (the largest pairs by stable identity, with labels); None when not asked"""


@dataclass(frozen=True)
class GraphChange:
    """A node or edge of the pruned graphs that appeared, vanished or changed weight between two checkpoints."""

    before: int
    after: int
    what: Literal["node", "edge"]
    change: Literal["appeared", "vanished", "changed"]
    identity: str
    """the stable identity (see the module docstring)"""
    label: str
    """the same in words, with the features' indices in each CLT"""
    weight_before: float | None
    """an edge's weight (direct effect) or a node's influence share before; None where it is not kept"""
    weight_after: float | None


@dataclass(frozen=True)
class GraphsAcross:
    """The graphs of one prompt at several checkpoints, in step order, and what changed between them."""

    steps: list[int]
    graphs: list[GraphStep]
    changes: list[GraphChange]
    counts: list[dict[str, int]]
    """per consecutive pair: nodes_appeared, nodes_vanished, edges_appeared, edges_vanished (every one),
    features_matched (latents of the later CLT that continue one of the earlier, all layers)"""
    tokens: list[int]
    token_strings: list[str] | None
    targets: list[str]
    """the target labels (the same targets at every checkpoint)"""
    match_threshold: float
    formation: dict[str, Any] | None = None
    """the formation report's curves (steps, max_induction, max_prev_token, formation_step) or None"""
    meta: dict[str, Any] = field(default_factory=dict)
    shared: bool = False
    """one CLT for every checkpoint: features are named by their index (no tracks)"""
    fit: list[dict[str, Any]] | None = None
    """with a shared CLT and each checkpoint's own CLTs to compare: per step, `interplab.graphs.shared.fit_row`
    (fvu / kl / replacement / completeness, ``_shared`` and ``_own``); None otherwise"""

    def changes_between(self, before: int, after: int) -> list[GraphChange]:
        return [c for c in self.changes if (c.before, c.after) == (before, after)]

    def table(self) -> list[dict[str, Any]]:
        """One row per checkpoint: scores, sizes, the formation scores, and what changed since the previous."""
        rows = []
        for i, g in enumerate(self.graphs):
            c = self.counts[i - 1] if i > 0 else {}
            rows.append(
                {
                    "step": g.step,
                    "induction": g.induction,
                    "prev_token": g.prev_token,
                    "p_target": g.target_probability[0] if g.target_probability else None,
                    "replacement": g.replacement,
                    "completeness": g.completeness,
                    "features": g.n_features,
                    "kept_features": g.n_kept_features,
                    "nodes": g.n_nodes,
                    "edges": g.n_edges,
                    "earlier_positions": sum(g.position_influence[:-1]),
                    "nodes_appeared": c.get("nodes_appeared"),
                    "nodes_vanished": c.get("nodes_vanished"),
                    "edges_appeared": c.get("edges_appeared"),
                    "edges_vanished": c.get("edges_vanished"),
                    **_qk_cells(g.qk),
                }
            )
        return rows

    def markdown(self) -> str:
        cols = [
            ("step", "step"), ("induction", "induction"), ("prev_token", "prev-token"),
            ("p_target", "p(target)"), ("replacement", "replacement"), ("completeness", "completeness"),
            ("features", "features"), ("kept_features", "kept features"), ("nodes", "kept nodes"), ("edges", "kept edges"),
            ("earlier_positions", "influence from earlier positions"), ("nodes_appeared", "nodes +"),
            ("nodes_vanished", "nodes -"), ("edges_appeared", "edges +"), ("edges_vanished", "edges -"),
        ]  # fmt: skip
        if any(g.qk for g in self.graphs):
            cols += [("qk_score", "QK score"), ("qk_previous", "through previous"), ("qk_top", "top QK pair")]
        lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---:|" * len(cols)]
        for row in self.table():
            lines.append("| " + " | ".join(_cell(row[k]) for k, _ in cols) + " |")
        if self.fit:
            lines += ["", fit_markdown(self.fit)]
        return "\n".join(lines)

    def plot(self) -> go.Figure:
        """The formation scores with the graphs' steps marked, where the influence enters the prompt at each
        checkpoint (a heatmap), and the kept and changed nodes per checkpoint (Plotly)."""
        from plotly.subplots import make_subplots

        qks = [g.qk for g in self.graphs]
        with_qk = any(qks)
        titles = [
            "formation scores (graphs at the marked steps)",
            "share of the targets' influence entering at each position",
            "pruned graph: kept features, and nodes appeared / vanished since the previous graph",
        ]
        if with_qk:
            first = next(q for q in qks if q)
            titles.append(
                f"QK attribution of L{first['layer']}H{first['head']}, query {first['query_pos']} -> key "
                f"{first['key_pos']}: the score by query x key kind and route (hover: the top pairs)"
            )
        fig = make_subplots(rows=len(titles), cols=1, vertical_spacing=0.08, subplot_titles=titles)
        f = self.formation
        if f:
            for key, name in (("max_induction", "induction"), ("max_prev_token", "previous-token")):
                fig.add_scatter(x=f["steps"], y=f[key], name=name, mode="lines", row=1, col=1)
            scored = [g for g in self.graphs if g.induction is not None]
            fig.add_scatter(
                x=[g.step for g in scored],
                y=[g.induction for g in scored],
                name="graphs",
                mode="markers",
                marker={"size": 10, "symbol": "diamond"},
                row=1,
                col=1,
            )
            if f.get("formation_step") is not None:
                fig.add_vline(x=f["formation_step"], line_dash="dot", line_color="gray", row=1, col=1)
        labels = _position_labels(self.tokens, self.token_strings)
        fig.add_heatmap(
            z=[g.position_influence for g in self.graphs],
            x=labels,
            y=[f"step {s}" for s in self.steps],
            colorscale="Blues",
            showscale=False,
            row=2,
            col=1,
        )
        names = [f"step {s}" for s in self.steps]
        fig.add_bar(x=names, y=[g.n_kept_features for g in self.graphs], name="kept features", row=3, col=1)
        fig.add_bar(
            x=names,
            y=[0] + [c["nodes_appeared"] for c in self.counts],
            name="nodes appeared",
            row=3,
            col=1,
        )
        fig.add_bar(
            x=names,
            y=[0] + [c["nodes_vanished"] for c in self.counts],
            name="nodes vanished",
            row=3,
            col=1,
        )
        if with_qk:
            _qk_traces(fig, names, qks, row=4)
        fig.update_xaxes(title_text="step", row=1, col=1)
        fig.update_yaxes(range=[0, 1], row=1, col=1)
        target = ", ".join(self.targets[:3])
        fig.update_layout(
            title=f"attribution graphs across training (target {target})",
            height=1200 if with_qk else 900,
            width=1100,
            barmode="group",
        )
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "graphs": [asdict(g) for g in self.graphs],
            "changes": [asdict(c) for c in self.changes],
            "counts": self.counts,
            "tokens": self.tokens,
            "token_strings": self.token_strings,
            "targets": self.targets,
            "match_threshold": self.match_threshold,
            "formation": self.formation,
            "meta": self.meta,
            "shared": self.shared,
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphsAcross:
        return cls(
            steps=list(data["steps"]),
            graphs=[GraphStep(**g) for g in data["graphs"]],
            changes=[GraphChange(**c) for c in data["changes"]],
            counts=list(data["counts"]),
            tokens=list(data["tokens"]),
            token_strings=data.get("token_strings"),
            targets=list(data["targets"]),
            match_threshold=data["match_threshold"],
            formation=data.get("formation"),
            meta=dict(data.get("meta", {})),
            shared=bool(data.get("shared", False)),
            fit=data.get("fit"),
        )

    def save(self, folder: str | Path) -> dict[str, str | None]:
        """``report.json`` (kind graph_across), ``across.md`` (the table) and ``across.html`` / ``.png``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        report = runs.write_json(folder / runs.REPORT, runs.Kind.GRAPH_ACROSS, self.to_dict())
        atomic_write_text(folder / "across.md", self.markdown() + "\n")
        pictures = write_figure_files(self.plot(), folder, "across", assets=self.meta.get("run"))
        return {"json": str(report), "table": str(folder / "across.md"), **pictures}

    @classmethod
    def load(cls, folder: str | Path) -> GraphsAcross:
        return cls.from_dict(runs.Report.open(folder, runs.Kind.GRAPH_ACROSS).data)

    def __repr__(self) -> str:
        pairs = ", ".join(
            f"{a}->{b}: +{c['nodes_appeared']}/-{c['nodes_vanished']} nodes"
            for a, b, c in zip(self.steps, self.steps[1:], self.counts, strict=True)
        )
        return f"GraphsAcross(steps {self.steps}; {pairs})"


def _qk_cells(qk: dict[str, Any] | None) -> dict[str, Any]:
    if not qk:
        return {"qk_score": None, "qk_previous": None, "qk_top": None}
    pair = _pair_text(qk["top"][0], qk["key_pos"]) if qk["top"] else None
    return {"qk_score": qk["score"], "qk_previous": qk["through_previous"], "qk_top": pair}


def _pair_text(p: dict[str, Any], key_pos: int) -> str:
    """``query x key (prev): +0.123``: one pair of `GraphStep.qk`'s top, ``(prev)`` through the previous key."""
    via = " (prev)" if p["through"] != key_pos else ""
    return f"{p['query']} x {p['key']}{via}: {p['part']:+.3f}"


def _qk_traces(fig: Any, names: list[str], qks: list[dict[str, Any] | None], row: int) -> None:
    """Stacked bars per step: the score's parts by query kind x key kind x route (the largest groups), the
    score as a marker, the top pairs on hover."""
    groups: dict[str, float] = {}
    for q in qks:
        for k, v in (q or {}).get("by_kind", {}).items():
            groups[k] = groups.get(k, 0.0) + abs(v)
    shown = sorted(groups, key=lambda k: -groups[k])[:6]
    hover = ["<br>".join(_pair_text(p, q["key_pos"]) for p in q["top"][:3]) if q else "" for q in qks]
    for k in shown:
        fig.add_bar(
            x=names,
            y=[(q or {}).get("by_kind", {}).get(k, 0.0) for q in qks],
            name=f"QK: {k}",
            row=row,
            col=1,
        )
    rest = [
        sum(v for k, v in (q or {}).get("by_kind", {}).items() if k not in shown) if q else 0.0 for q in qks
    ]
    if any(rest):
        fig.add_bar(x=names, y=rest, name="QK: other", row=row, col=1)
    fig.add_scatter(
        x=names,
        y=[q["score"] if q else None for q in qks],
        name="QK score",
        mode="markers",
        marker={"size": 12, "symbol": "x", "color": "black"},
        hovertext=hover,
        row=row,
        col=1,
    )
    fig.update_layout(**{f"yaxis{row}": {"title": {"text": "score part"}}})


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _position_labels(tokens: list[int], strings: list[str] | None) -> list[str]:
    return [f"{i}:{strings[i] if strings else t}" for i, t in enumerate(tokens)]


# ---- comparing graphs ---------------------------------------------------------------------------------
def _identities(graph: AttributionGraph, tracks: list[tuple[Tensor, Tensor]], steps: list[int]) -> list[str]:
    ids = graph.node_ids()
    for i, node in enumerate(graph.nodes[: graph.n_features]):
        assert node.layer is not None and node.feature is not None
        start, feat = tracks[node.layer]
        ids[i] = f"{node.layer}_{int(feat[node.feature])}@{steps[int(start[node.feature])]}_{node.position}"
    return ids


def _label(graph: AttributionGraph, i: int) -> str:
    node = graph.nodes[i]
    pos = node.position
    tok = f" {graph.token_strings[pos]!r}" if graph.token_strings else ""
    if node.kind is NodeKind.FEATURE:
        return f"layer {node.layer} feature {node.feature} at {pos}{tok}"
    if node.kind is NodeKind.ERROR:
        return f"layer {node.layer} error at {pos}{tok}"
    if node.kind is NodeKind.EMBEDDING:
        return f"token {node.feature} at {pos}{tok}"
    return f"logit {graph.targets[i - graph.logit_slice.start].label}"


def _position_influence(graph: AttributionGraph, node_influence: Tensor) -> list[float]:
    errors = node_influence[graph.error_slice].reshape(graph.n_layers, graph.n_pos).sum(0)
    inputs = errors + node_influence[graph.token_slice]
    total = float(inputs.sum())
    return [float(v) / total if total > 0 else 0.0 for v in inputs]


def _formation_at(formation: FormationResult | None, step: int) -> tuple[float | None, float | None]:
    if formation is None or step not in formation.steps:
        return None, None
    i = formation.steps.index(step)
    return formation.max_induction[i], formation.max_prev_token[i]


_KIND = {NodeKind.FEATURE: "feature", NodeKind.ERROR: "error", NodeKind.EMBEDDING: "token"}


def _qk_summary(
    qk: QKAttribution, ids: list[str], label: Callable[[int], str], k: int = QK_TOP
) -> dict[str, Any]:
    """What `GraphStep.qk` holds: the score, its routes, by kind, and the k largest pairs by stable identity."""
    graph = qk.graph
    n = qk.pairs.shape[0]
    kinds = [_KIND[node.kind] for node in graph.nodes[:n]]
    by_kind: dict[str, float] = {}

    def add(key: str, v: float) -> None:
        by_kind[key] = by_kind.get(key, 0.0) + v

    index = {name: torch.tensor([i for i, kd in enumerate(kinds) if kd == name], dtype=torch.long)
             for name in ("feature", "error", "token")}  # fmt: skip
    routes = [("own", qk.pairs, qk.query_const, qk.key_const, qk.const)]
    if qk.pairs_prev is not None:
        assert qk.query_const_prev is not None and qk.key_const_prev is not None
        routes.append(("previous", qk.pairs_prev, qk.query_const_prev, qk.key_const_prev, qk.const_prev))
    for route, pairs, qc, kc, c in routes:
        for a, ia in index.items():
            if not len(ia):
                continue
            add(f"{a} x const, {route}", float(qc[ia].sum()))
            add(f"const x {a}, {route}", float(kc[ia].sum()))
            for b, ib in index.items():
                if len(ib):
                    add(f"{a} x {b}, {route}", float(pairs[ia][:, ib].sum()))
        add(f"const x const, {route}", float(c))
    position = {qk.key_pos: "its own key", qk.key_pos - 1: "the previous position's key"}
    index_of = {name: i for i, name in enumerate(graph.node_ids())}
    top = [
        {
            "query": ids[index_of[p.query]],
            "key": ids[index_of[p.key]],
            "part": p.part,
            "through": p.through,
            "label": f"{label(index_of[p.query])} x {label(index_of[p.key])} (through {position[p.through]})",
        }
        for p in qk.top(k)
    ]
    return {
        "layer": qk.layer,
        "head": qk.head,
        "query_pos": qk.query_pos,
        "key_pos": qk.key_pos,
        "score": qk.score,
        "gate": qk.gate,
        "current": float(qk.current),
        "through_previous": float(qk.through_previous),
        "by_kind": {key: v for key, v in by_kind.items() if v != 0.0},
        "top": top,
    }


def induction_edge(tokens: Sequence[int] | Tensor, query_pos: int | None = None) -> tuple[int, int]:
    """The induction head's attention edge in a prompt: the query at ``query_pos`` (default the last position)
    and the key at the position after that token's latest earlier occurrence."""
    toks = torch.as_tensor(tokens).reshape(-1).tolist()
    q = len(toks) - 1 if query_pos is None else query_pos
    if not 0 <= q < len(toks):
        raise ValueError(f"query position {q} is outside the prompt's {len(toks)} positions")
    earlier = [p for p in range(q) if toks[p] == toks[q]]
    if not earlier:
        raise ValueError(
            f"token {toks[q]} at the query position {q} does not occur earlier in the prompt, so there is no "
            "induction edge: repeat it, or name the edge (qk_positions=(QUERY, KEY), `--qk-positions Q,K`)"
        )
    return q, earlier[-1] + 1


def compare_graphs(
    steps: Sequence[int],
    graphs: Sequence[AttributionGraph],
    pruned: Sequence[PrunedGraph],
    clts: Sequence[CrossLayerTranscoder],
    *,
    qks: Sequence[QKAttribution | None] | None = None,
    formation: FormationResult | None = None,
    match_threshold: float = MATCH_THRESHOLD,
    folders: Sequence[str | Path | None] | None = None,
    meta: dict[str, Any] | None = None,
    fit: list[dict[str, Any]] | None = None,
) -> GraphsAcross:
    """Compare the graphs of one prompt at ``steps`` (increasing), each pruned, with the CLT it was built with
    (see the module docstring): their scores and sizes, the formation report's scores at each step, and the
    nodes and edges that appeared, vanished or changed between consecutive steps; with ``qks`` (the QK
    attribution of one attention edge at each step, `qk_attribution(..., graph=graphs[k])`) also its summary
    (`GraphStep.qk`), pairs named by stable identity. When every step's CLT is the same object (one shared
    dictionary) features keep their own ids, ``{layer}_{feature}_{pos}``; ``fit`` is stored as
    `GraphsAcross.fit`."""
    n = len(steps)
    if not n or not len(graphs) == len(pruned) == len(clts) == n:
        raise ValueError(
            f"give one graph, pruning and CLT per step: {n} steps, {len(graphs)} graphs, {len(pruned)} "
            f"prunings, {len(clts)} CLTs"
        )
    if qks is not None and (
        len(qks) != n or any(q is not None and q.graph is not g for q, g in zip(qks, graphs, strict=False))
    ):
        raise ValueError(f"give one QK attribution per step, of that step's graph: {len(qks)} for {n} steps")
    if list(steps) != sorted(set(steps)):
        raise ValueError(f"steps must be distinct and increasing, got {list(steps)}")
    first = graphs[0]
    for s, g in zip(steps, graphs, strict=True):
        if not torch.equal(g.tokens, first.tokens):
            raise ValueError(f"the graph of step {s} is of another prompt: compare graphs of the same tokens")
        if [(t.token, t.token_b) for t in g.targets] != [(t.token, t.token_b) for t in first.targets]:
            raise ValueError(
                f"the graph of step {s} has other targets ({[t.label for t in g.targets]} vs "
                f"{[t.label for t in first.targets]}): build every graph for the same targets"
            )
    steps = list(steps)
    shared = all(c is clts[0] for c in clts)
    tracks, matched = _tracks(clts, match_threshold)
    summaries, kept_nodes, kept_edges, labels = [], [], [], []
    for k, (g, p) in enumerate(zip(graphs, pruned, strict=True)):
        ids = g.node_ids() if shared else _identities(g, tracks[k], steps)
        node_influence = influence(normalize_rows(g.adjacency), g.logit_weights)
        share = node_influence / node_influence.sum().clamp(min=1e-30)
        nodes = {ids[i]: (float(share[i]), i) for i in p.node_mask.nonzero().flatten().tolist()}
        edges = {
            f"{ids[s]} -> {ids[d]}": (float(g.adjacency[d, s]), s, d)
            for d, s in p.edge_mask.nonzero().tolist()
        }
        kept_nodes.append(nodes)
        kept_edges.append(edges)
        labels.append(lambda i, g=g: _label(g, i))
        induction, prev = _formation_at(formation, steps[k])
        this_qk = qks[k] if qks is not None else None
        scores = graph_scores(g)
        summaries.append(
            GraphStep(
                step=steps[k],
                folder=str(folders[k]) if folders is not None and folders[k] is not None else None,
                n_features=g.n_features,
                n_kept_features=int(p.node_mask[: g.n_features].sum()),
                n_nodes=p.n_nodes,
                n_edges=p.n_edges,
                replacement=scores["replacement"],
                completeness=scores["completeness"],
                target_probability=[t.weight for t in g.targets],
                position_influence=_position_influence(g, node_influence),
                induction=induction,
                prev_token=prev,
                qk=_qk_summary(this_qk, ids, labels[-1]) if this_qk is not None else None,
            )
        )
    changes: list[GraphChange] = []
    counts = []
    for k in range(1, n):
        a, b = steps[k - 1], steps[k]
        na, nb, ea, eb = kept_nodes[k - 1], kept_nodes[k], kept_edges[k - 1], kept_edges[k]
        appeared = sorted(set(nb) - set(na), key=lambda x: -nb[x][0])
        vanished = sorted(set(na) - set(nb), key=lambda x: -na[x][0])
        e_app = sorted(set(eb) - set(ea), key=lambda x: -abs(eb[x][0]))
        e_van = sorted(set(ea) - set(eb), key=lambda x: -abs(ea[x][0]))
        both = sorted(set(ea) & set(eb), key=lambda x: -abs(eb[x][0] - ea[x][0]))[:N_CHANGED]
        la, lb = labels[k - 1], labels[k]
        changes += [
            GraphChange(a, b, "node", "appeared", x, lb(nb[x][1]), None, nb[x][0])
            for x in appeared[:MAX_LISTED]
        ]
        changes += [
            GraphChange(a, b, "node", "vanished", x, la(na[x][1]), na[x][0], None)
            for x in vanished[:MAX_LISTED]
        ]

        def edge_label(e: tuple[float, int, int], lab: Callable[[int], str]) -> str:
            return f"{lab(e[1])} -> {lab(e[2])}"

        changes += [
            GraphChange(a, b, "edge", "appeared", x, edge_label(eb[x], lb), None, eb[x][0])
            for x in e_app[:MAX_LISTED]
        ]
        changes += [
            GraphChange(a, b, "edge", "vanished", x, edge_label(ea[x], la), ea[x][0], None)
            for x in e_van[:MAX_LISTED]
        ]
        changes += [
            GraphChange(a, b, "edge", "changed", x, edge_label(eb[x], lb), ea[x][0], eb[x][0]) for x in both
        ]
        counts.append(
            {
                "nodes_appeared": len(appeared),
                "nodes_vanished": len(vanished),
                "edges_appeared": len(e_app),
                "edges_vanished": len(e_van),
                "features_matched": sum(matched[k - 1]),
            }
        )
    curves = None
    if formation is not None:
        curves = {
            "steps": list(formation.steps),
            "max_induction": formation.max_induction,
            "max_prev_token": formation.max_prev_token,
            "formation_step": formation.formation_step,
        }
    return GraphsAcross(
        steps=steps,
        graphs=summaries,
        changes=changes,
        counts=counts,
        tokens=first.tokens.tolist(),
        token_strings=first.token_strings,
        targets=[t.label for t in first.targets],
        match_threshold=match_threshold,
        formation=curves,
        meta=dict(meta or {}),
        shared=shared,
        fit=fit,
    )


# ---- along a training run -----------------------------------------------------------------------------
def run_clts(clts: str | Path) -> dict[int, Path]:
    """The CLT folders of a CLT run across checkpoints (`interplab clt train --checkpoints`), by step."""
    run = CLTTrainRun.open(clts)
    if not run.across:
        raise ValueError(
            f"{clts} holds one CLT, not one per checkpoint: train them with "
            "`interplab clt train --model RUN --checkpoints A,B,...`"
        )
    found = {runs.checkpoint_step(name): path for name, path in run.clts.items()}
    return {s: p for s, p in sorted(found.items()) if s is not None}


def _formation(run: Path) -> FormationResult | None:
    path = run / runs.FORMATION / runs.FORMATION_JSON
    if not path.is_file():
        return None
    return FormationResult.from_dict(runs.read_json(path, runs.Kind.FORMATION))


def graphs_across(
    run: str | Path,
    clts: str | Path,
    prompt: str | Sequence[int],
    targets: Targets = None,
    *,
    steps: Sequence[int] | None = None,
    out: str | Path | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    memory_gb: float = 8.0,
    match_threshold: float = MATCH_THRESHOLD,
    qk: tuple[int, int] | None = None,
    qk_positions: tuple[int, int] | None = None,
    clt: Literal["per_checkpoint", "shared"] = "per_checkpoint",
    own_clts: str | Path | None = None,
    fit_tokens: Tensor | Sequence[Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> GraphsAcross:
    """The graph of ``prompt`` at each checkpoint of training run ``run`` that ``clts`` (a CLT run across its
    checkpoints) has a CLT for (or at ``steps`` of them), for the same ``targets`` at every step (None: the
    last checkpoint's most likely next token), compared by `compare_graphs` with the run's formation scores.
    With ``out`` each graph is saved in ``out/step_N/`` (a graph already there for the same prompt, targets,
    CLT and thresholds is read, not rebuilt: an interrupted job resumes) and the comparison in ``out``.
    With ``qk=(layer, head)`` the score of that head on one attention edge is attributed at each step to
    pairs of query-side and key-side nodes (`qk_attribution`): the edge ``qk_positions=(query, key)``, by default
    the induction edge (`induction_edge`: the last position against the one after its token's earlier
    occurrence). ``progress(step)`` is called before each graph.

    ``clt="shared"``: ``clts`` is one CLT shared by the checkpoints (a `train_clt_shared` run, by default at the
    checkpoints it pooled; or a CLT folder, with ``steps``), every graph is built with it and features keep
    their index (see the module docstring). With ``own_clts`` (the run's CLTs per checkpoint) each step's graph
    is also built with its own CLT, and `GraphsAcross.fit` compares the two (`fit_row`: FVU and KL on
    ``fit_tokens``, by default the prompt itself, and the graphs' scores)."""
    if clt not in ("per_checkpoint", "shared"):
        raise ValueError(f"clt must be 'per_checkpoint' or 'shared', got {clt!r}")
    if own_clts is not None and clt != "shared":
        raise ValueError("own_clts compares a shared CLT with the per-checkpoint ones: give clt='shared'")
    train = runs.TrainRun.open(run)
    the_shared: CrossLayerTranscoder | None = None
    if clt == "shared":
        shared_path, chosen = shared_clt(clts, steps)
        the_shared = load_clt(shared_path)
        available = {s: shared_path for s in chosen}
    else:
        available = run_clts(clts)
        chosen = sorted(available) if steps is None else sorted(set(steps))
    own = run_clts(own_clts) if own_clts is not None else {}
    for where, have in ((clts, available), (own_clts, own)):
        missing = [s for s in chosen if s not in have]
        if where is not None and (missing or not chosen):
            raise ValueError(
                f"{where} has no CLT of step {missing or chosen}: it has CLTs of steps {sorted(have)}"
            )
    models = {}
    for s in chosen:
        try:
            models[s] = train.checkpoint(s).path
        except runs.RunError as err:
            raise ValueError(f"{clts} has a CLT of step {s} but the training run does not: {err}") from err
    last = load_model(models[chosen[-1]])
    if isinstance(prompt, str):
        bos = getattr(last.tokenizer, "bos_id", None) is not None
        tokens = last.to_tokens(prompt, prepend_bos=bos)[0]
    else:
        tokens = torch.as_tensor(list(prompt), dtype=torch.long)
    edge = None
    if qk is not None:
        layer, head = qk
        if not (0 <= layer < last.cfg.n_layers and 0 <= head < last.cfg.n_heads):
            raise ValueError(
                f"qk head L{layer}H{head}: the model has {last.cfg.n_layers} layers of {last.cfg.n_heads} heads"
            )
        edge = qk_positions if qk_positions is not None else induction_edge(tokens)
    if targets is None:
        last.check_tokens(tokens[None])
        with torch.no_grad():
            targets = [int(last(tokens[None])[0, -1].argmax())]
    graphs, prunings, transcoders, folders = [], [], [], []
    qks: list[QKAttribution | None] = []
    fit: list[dict[str, Any]] = []
    for s in chosen:
        if progress is not None:
            progress(s)
        model = last if s == chosen[-1] else load_model(models[s])
        if the_shared is not None:
            check_fits(the_shared.cfg, model, f"the shared CLT {available[s]} (at step {s})")
        this = the_shared if the_shared is not None else load_clt(available[s])
        meta = {"run": str(Path(run).absolute()), "clt": str(available[s].absolute()), "step": s}
        folder = Path(out) / runs.checkpoint_name(s) if out is not None else None
        graph, pruned = _reuse(folder, tokens, targets, meta, node_threshold, edge_threshold)
        if graph is None:
            graph = attribute(
                model,
                this,
                tokens,
                targets,
                max_feature_nodes=max_feature_nodes,
                batch_size=batch_size,
                memory_gb=memory_gb,
                meta={**meta, "prompt": prompt if isinstance(prompt, str) else None},
            )
            pruned = prune_graph(graph, node_threshold, edge_threshold)
            if folder is not None:
                graph.save(folder, pruned)
        assert pruned is not None
        if qk is not None and edge is not None:
            qks.append(
                qk_attribution(
                    model,
                    this,
                    tokens,
                    layer=qk[0],
                    head=qk[1],
                    query_pos=edge[0],
                    key_pos=edge[1],
                    graph=graph,
                )
            )
        if the_shared is not None and own_clts is not None:
            own_clt = load_clt(own[s])
            own_graph = attribute(
                model, own_clt, tokens, targets, max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                memory_gb=memory_gb,
            )  # fmt: skip
            fit_on = fit_tokens if fit_tokens is not None else tokens[None]
            fit.append(fit_row(s, model, the_shared, own_clt, graph, own_graph, fit_on))
        graphs.append(graph)
        prunings.append(pruned)
        transcoders.append(this)
        folders.append(folder.name if folder is not None else None)
    result = compare_graphs(
        chosen,
        graphs,
        prunings,
        transcoders,
        qks=qks if qk is not None else None,
        formation=_formation(train.path),
        match_threshold=match_threshold,
        folders=folders,
        meta={
            "run": str(train.path),
            "clts": str(clts),
            "prompt": prompt if isinstance(prompt, str) else None,
            "node_threshold": node_threshold,
            "edge_threshold": edge_threshold,
            "qk": None if edge is None or qk is None else {"layer": qk[0], "head": qk[1], "edge": list(edge)},
            "own_clts": None if own_clts is None else str(own_clts),
        },
        fit=fit or None,
    )
    if out is not None:
        result.save(out)
    return result


def _reuse(
    folder: Path | None,
    tokens: Tensor,
    targets: Any,
    meta: dict[str, Any],
    node_threshold: float,
    edge_threshold: float,
) -> tuple[AttributionGraph | None, PrunedGraph | None]:
    """A graph saved in ``folder`` for the same tokens, CLT and pruning (and targets, when given as ids)."""
    if folder is None or runs.detect(folder) is not runs.Kind.ATTRIBUTION_GRAPH:
        return None, None
    report = runs.GraphRun.open(folder).report
    same = (
        report.get("tokens") == tokens.tolist()
        and report.get("meta", {}).get("clt") == meta["clt"]
        and report.get("pruned", {}).get("node_threshold") == node_threshold
        and report.get("pruned", {}).get("edge_threshold") == edge_threshold
        and (not isinstance(targets, list) or [t["token"] for t in report.get("targets", [])] == targets)
    )
    if not same:
        return None, None
    return AttributionGraph.load(folder), AttributionGraph.load_pruned(folder)


__all__ = [
    "MATCH_THRESHOLD",
    "GraphChange",
    "GraphStep",
    "GraphsAcross",
    "compare_graphs",
    "graphs_across",
    "induction_edge",
    "match_features",
    "run_clts",
]
