"""Edge attribution patching and its integrated-gradient variants: every edge scored at once.

Every method here scores the edge ``u -> v.slot`` as

    score = sum over positions and d_model of (z_u(corrupt) - z_u(clean)) * mean over points P of d metric / d x_v

where ``z_u`` is the sender's output, ``x_v`` the receiver slot's input (the per-head ``hook_q/k/v_input``,
``hook_mlp_in``, or the final residual stream for ``logits``) and the metric is averaged over the examples.
A score is a first-order estimate of the change of the mean metric when that edge alone carries its
corrupted value (negative: the edge carries the behaviour). The methods differ only in the points ``P`` where
the gradient is taken (the definitions of MIB's reference code, ``hannamw/EAP-IG``, paraphrased):

- `eap` (Syed, Rager & Conmy 2023): the clean run.
- `eap_ig` with ``variant="inputs"`` (EAP-IG, Hanna, Pezzelle & Belinkov 2024; MIB's ``EAP-IG-inputs``): the
  clean run with the token embedding replaced by ``e_corrupt + (k / m)(e_clean - e_corrupt)`` for
  ``k = 0 .. m-1`` (integrated gradients along the straight path from the corrupted to the clean input,
  left Riemann sum: ``k = 0`` is the corrupted embedding, the clean endpoint is not a point). Positions,
  attention mask and positional embedding stay the clean input's (as in MIB, which leaves ``pos_embed`` out
  of the path). Only counterfactual corruption: there is no corrupted input to interpolate from an ablation.
- `eap_ig` with ``variant="activations"`` (MIB's ``EAP-IG-activations``): for each group of senders (the
  token embedding, all heads of one layer, one MLP) and ``k = 1 .. m``, the clean run with that group's
  output replaced by ``(k / m) z_clean + (1 - k / m) z_corrupt``; as in the reference code the gradient of
  every slot is averaged over all ``m (2 L + 1)`` runs (not only the runs of the edge's own sender group).
  Works with zero and mean ablation too (the corrupted value is the ablation's).
- `clean_corrupted` (the two-point version of the same paper): the clean run and the corrupted run (the
  corrupted rows with their own mask), averaged.

Identities the tests check: ``eap_ig(variant="activations", steps=1)`` is `eap` (its one point per group is
the clean run); ``clean_corrupted`` is the mean of `eap` and ``eap_ig(steps=1)`` (whose one point is the
corrupted embedding) when clean and corrupted rows share positions; completeness: the scores of the edges out
of ``embed`` sum to ``metric(corrupt) - metric(clean)`` up to the Riemann error, shrinking as ``1/m``.

Implementation: all points of a batch of examples run in one forward (the rows stacked, each point's
replacement written into its rows by a forward hook), one backward (``torch.autograd.grad`` w.r.t. the
embedding, so parameters get no ``.grad``); backward hooks at every slot sum the gradient over the points
and contract it at once with the [senders, batch, pos, d_model] matrix of activation differences, giving a
[senders, slots] score matrix; edges read their entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
from torch import Tensor

from interplab.circuits.circuit import Circuit, DiscoveryTask, faithfulness, layout
from interplab.circuits.engine import Ablation, EdgeEngine
from interplab.circuits.graph import ComponentGraph, Edge, Node, NodeKind, Slot
from interplab.circuits.split import kv_per_query_head, post_norm_jvp
from interplab.hooks.site import Site, SiteKind
from interplab.model.config import Positional
from interplab.model.transformer import Transformer


class ScoreSign(str, Enum):
    """What the sign of an edge score means (`EdgeScores.importance` turns both into "higher = keep")."""

    EFFECT = "effect"
    """the estimated change of the metric when the edge alone is corrupted: negative = the edge carries the
    behaviour (attribution methods)"""
    IMPORTANCE = "importance"
    """higher = more part of the circuit (e.g. a learned mask's inclusion probability)"""


@dataclass(frozen=True)
class EdgeScores:
    """A score for every edge of the graph, from any discovery method (EAP, EAP-IG, learned masks ...)."""

    edges: tuple[Edge, ...]
    scores: Tensor
    passes: dict[str, int]
    """forward and backward passes over the data used"""
    method: str = "eap"
    sign: ScoreSign = ScoreSign.EFFECT
    details: dict[str, Any] = field(default_factory=dict)
    """the method's own settings (steps, variant ...)"""

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.edges),):
            raise ValueError(
                f"EdgeScores needs one score per edge: {len(self.edges)} edges, scores of shape "
                f"{tuple(self.scores.shape)}"
            )

    @property
    def importance(self) -> Tensor:
        """Scores oriented so that higher means more part of the circuit (MIB's signed ranking)."""
        return -self.scores if self.sign is ScoreSign.EFFECT else self.scores

    def order(self, *, absolute: bool = True) -> Tensor:
        """Edge indices, best first: by decreasing ``|score|`` or (``absolute=False``) decreasing importance."""
        key = self.scores.abs() if absolute else self.importance
        return torch.argsort(key, descending=True, stable=True)

    def ranked(self, *, absolute: bool = True) -> list[tuple[str, float]]:
        """``(edge name, score)`` best first (see `order`)."""
        return [(self.edges[i].name, float(self.scores[i])) for i in self.order(absolute=absolute).tolist()]

    def top(self, k: int, *, absolute: bool = True) -> set[Edge]:
        """The ``k`` best edges (see `order`)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return {self.edges[i] for i in self.order(absolute=absolute)[:k].tolist()}

    def by_name(self) -> dict[str, float]:
        return {e.name: float(s) for e, s in zip(self.edges, self.scores.tolist(), strict=True)}


class Attribution(str, Enum):
    """The gradient-based edge scores of this module (the names MIB's ``--method`` uses, lower case)."""

    EAP = "eap"
    EAP_IG = "eap-ig"
    """EAP-IG-inputs"""
    EAP_IG_ACTIVATIONS = "eap-ig-activations"
    CLEAN_CORRUPTED = "clean-corrupted"


@dataclass(frozen=True)
class _Point:
    """One point where gradients are taken: the clean rows (or the corrupted rows), with one sender group's
    output replaced by ``alpha * clean + (1 - alpha) * corrupt``."""

    group: int | None = None
    alpha: float = 1.0
    corrupted_rows: bool = False

    @property
    def plain_clean(self) -> bool:
        return self.group is None and not self.corrupted_rows


def _groups(cfg) -> list[Site]:
    """The sender groups EAP-IG-activations interpolates, by the site whose output it replaces."""
    out = [Site(SiteKind.EMBED)]
    for layer in range(cfg.n_layers):
        out.append(Site(SiteKind.RESULT, layer))
        if cfg.has_mlp:
            out.append(Site(SiteKind.MLP_OUT, layer))
    return out


_SLOT_INPUT = {Slot.Q: SiteKind.Q_INPUT, Slot.K: SiteKind.K_INPUT, Slot.V: SiteKind.V_INPUT}
"""the site of each attention slot's per-head input (an MLP's input, `Slot.IN`, is ``hook_mlp_in``)"""


class _Layout:
    """Senders and receiver slots as rows and columns of the score matrix, and where each slot's gradient is."""

    def __init__(self, graph: ComponentGraph) -> None:
        cfg = graph.cfg
        self.graph = graph
        self.senders = graph.senders_all
        self.sender_index = {n: i for i, n in enumerate(self.senders)}
        slots = [(r, s) for r in graph.nodes for s in r.slots]
        self.slot_index = {rs: i for i, rs in enumerate(slots)}
        # per gradient site: the score-matrix columns it fills (one per head, or one) and how many senders
        # (a prefix of `senders`: every receiver reads everything written before it) it contracts with
        self.sites: dict[str, tuple[list[int], int]] = {}
        for (r, s), col in self.slot_index.items():
            n = len(graph.senders(r))
            if graph.senders(r) != self.senders[:n]:
                raise AssertionError(f"the senders of {r.name} are not a prefix of the graph's senders")
            if r.kind is NodeKind.HEAD:
                name = Site(_SLOT_INPUT[s], r.layer).name
            elif r.kind is NodeKind.MLP:
                name = Site(SiteKind.MLP_IN, r.layer).name
            else:
                name = Site(SiteKind.RESID_POST, cfg.n_layers - 1).name
            cols, prev = self.sites.get(name, ([], n))
            if prev != n:
                raise AssertionError(f"the slots read at {name} have different senders")
            cols.append(col)
            self.sites[name] = (cols, n)
        self.edge_rows = torch.tensor([self.sender_index[e.sender] for e in graph.edges])
        self.edge_cols = torch.tensor([self.slot_index[(e.receiver, e.slot)] for e in graph.edges])


def _values(engine: EdgeEngine, task: DiscoveryTask, rows: Tensor, chunk: Tensor) -> dict[Node, Tensor]:
    """Every sender's corrupted value for the clean rows ``rows`` (``chunk``: their index in task.clean)."""
    corrupt = task.corrupt
    out = {}
    for n in engine.graph.senders_all:
        if corrupt is Ablation.ZERO:
            out[n] = torch.zeros_like(engine.clean_output(n, rows[:1]))
        elif corrupt is Ablation.MEAN:
            out[n] = engine.mean_output(n)[None]
        else:
            out[n] = engine.clean_output(n, corrupt[chunk])
    return out


def _raw(engine: EdgeEngine, site: Site, values: dict[Node, Tensor]) -> Tensor:
    """What ``site`` holds given the group's sender values (head results without their bias share)."""
    graph, model = engine.graph, engine.model
    if site.kind is SiteKind.EMBED:
        return values[graph.node("embed")]
    if site.kind is SiteKind.MLP_OUT:
        return values[graph.node(f"m{site.layer}")]
    heads = [values[graph.node(f"a{site.layer}.{h}")] for h in range(model.cfg.n_heads)]
    b = max(x.shape[0] for x in heads)
    out = torch.stack([x.expand(b, *x.shape[1:]) for x in heads], dim=2)
    return out - model.blocks[site.layer].attn.b_O / model.cfg.n_heads  # type: ignore[index]


class _Batch:
    """One batch of clean examples (``chunk``: their indices in ``task.clean``): its senders' clean and corrupted
    values, the difference matrix, and gradient passes over groups of points that add into the score matrix."""

    def __init__(
        self,
        model: Transformer,
        engine: EdgeEngine,
        task: DiscoveryTask,
        plan: _Layout,
        chunk: Tensor,
        *,
        record: bool,
    ):
        self.model = model  # the engine's model, or (GQA) its copy with one key/value input per query head
        self.engine, self.task, self.plan, self.chunk = engine, task, plan, chunk
        self.b = chunk.numel()
        self.groups = _groups(engine.model.cfg)
        self.names = [g.name for g in self.groups]
        self.corrupt = _values(engine, task, task.clean[chunk], chunk)
        self.record = record  # the first pass's first point is the clean run: read the clean senders off it
        self.clean = {} if record else {n: engine.clean_output(n, task.clean[chunk]) for n in plan.senders}
        self.delta: Tensor | None = None

    def run(self, todo: Sequence[_Point], matrix: Tensor, n_total: int) -> None:
        """One forward of every point in ``todo`` (stacked) and one backward adding into ``matrix``."""
        engine, task, b = self.engine, self.task, self.b
        model, cfg = self.model, self.model.cfg
        record, self.record = self.record, False
        pos_site = Site(SiteKind.POS_EMBED).name
        recorded: dict[str, Tensor] = {}
        leaf: list[Tensor] = []

        def hook(act: Tensor, site: Site) -> Tensor | None:
            if record:
                recorded[site.name] = act[:b].detach()
            if site.name == pos_site:
                return None
            g = self.names.index(site.name)
            mine = [(i, pt.alpha) for i, pt in enumerate(todo) if pt.group == g]
            if g and not mine:
                return None
            out = act.detach().clone() if g == 0 else act.clone()
            if mine:
                lo, hi = _raw(engine, self.groups[g], self.corrupt), _raw(engine, self.groups[g], self.clean)
                for i, alpha in mine:
                    out[i * b : (i + 1) * b] = alpha * hi + (1 - alpha) * lo
            if g == 0:  # the embedding is the leaf gradients are taken towards
                out.requires_grad_(True)
                leaf.append(out)
            return out

        def contract(grad: Tensor, site: Site) -> None:
            cols, n = self.plan.sites[site.name]
            g = grad.detach().unflatten(0, (len(todo), b)).sum(0)
            d = self.delta[:n].flatten(1)  # type: ignore[index]  # [senders, batch*pos*d_model]
            if g.dim() == 4:  # per-head slots [batch pos heads d_model]: one matrix product for all heads
                if g.shape[2] != len(cols):
                    raise ValueError(
                        f"{site.name} has {g.shape[2]} per-head inputs, the graph {len(cols)} slots"
                    )
                matrix[:n, cols] += (d @ g.movedim(2, 3).reshape(-1, len(cols))).double()
            else:
                matrix[:n, cols[0]] += (d @ g.reshape(-1)).double()

        wanted = {0} | {pt.group for pt in todo if pt.group is not None}
        sites = self.names if record else [self.names[g] for g in sorted(wanted)]
        fwd = [(name, hook) for name in sites]
        if record and cfg.positional is Positional.LEARNED:
            fwd.append((pos_site, hook))
        bwd = [(name, contract) for name in self.plan.sites]
        sources = [
            task.clean if not pt.corrupted_rows or isinstance(task.corrupt, Ablation) else task.corrupt
            for pt in todo
        ]
        rows = torch.cat([src[self.chunk] for src in sources])
        mask = None if engine.attention_mask is None else engine.attention_mask[rows]
        with torch.enable_grad(), model.hooks(fwd, bwd):
            logits = model(engine.tokens[rows], attention_mask=mask)
            if self.delta is None:
                if record:
                    self.clean = _recorded_senders(engine, recorded)
                self.delta = _delta(self.plan, self.corrupt, self.clean)
                if cfg.post_norms:
                    self._through_post_norms()
            loss = task.metric(logits, task.clean[self.chunk].repeat(len(todo))).sum() / n_total
            torch.autograd.grad(loss, leaf)

    def _through_post_norms(self) -> None:
        """Post-norms (Gemma-2): a head's change reaches every receiver through its layer's post-norm; to first
        order that is the norm's Jacobian at the clean attention output applied to the change (the engine
        branch's `post_norm_jvp`, at the clean point for every method)."""
        assert self.delta is not None
        index = self.plan.sender_index
        for layer in range(self.model.cfg.n_layers):
            heads = [n for n in self.plan.senders if n.kind is NodeKind.HEAD and n.layer == layer]
            rows = [index[h] for h in heads]
            results = _raw(self.engine, Site(SiteKind.RESULT, layer), self.clean)
            stacked = self.delta[rows].movedim(0, 2)  # [batch pos heads d_model]
            self.delta[rows] = post_norm_jvp(self.model, layer, results, stacked).movedim(2, 0)


def _score(
    model: Transformer,
    task: DiscoveryTask,
    points: Sequence[_Point],
    *,
    engine: EdgeEngine | None,
    batch_size: int,
    method: str,
    details: dict[str, Any],
) -> EdgeScores:
    """The shared machinery of every method: see the module docstring."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    engine = engine or task.engine(model)
    graph = engine.graph
    plan = _Layout(graph)
    grad_model = kv_per_query_head(model)  # GQA: hook_k/v_input with one copy (slot) per query head
    n_total = task.clean.numel()
    if n_total == 0:
        raise ValueError(f"task {task.name!r} has no clean rows")
    if isinstance(task.corrupt, Ablation) and any(p.corrupted_rows for p in points):
        raise ValueError(
            f"{method} needs corrupted rows (task.corrupt), not the ablation {task.corrupt.value!r}"
        )
    # the plain clean point first: its pass records the clean senders (no separate clean forward)
    points = sorted(points, key=lambda p: not p.plain_clean)
    capture = points[0].plain_clean
    matrix = torch.zeros(len(plan.senders), len(plan.slot_index), dtype=torch.float64)
    per_chunk = min(n_total, batch_size)
    per_pass = max(1, batch_size // per_chunk)
    for start in range(0, n_total, per_chunk):
        chunk = torch.arange(start, min(n_total, start + per_chunk))
        batch = _Batch(grad_model, engine, task, plan, chunk, record=capture)
        for first in range(0, len(points), per_pass):
            batch.run(points[first : first + per_pass], matrix, n_total)
    dtype = torch.promote_types(model.W_E.dtype, torch.float32)  # float32, or float64 for a float64 model
    scores = (matrix[plan.edge_rows, plan.edge_cols] / len(points)).to(dtype)
    data = (0 if isinstance(task.corrupt, Ablation) else 1) + (0 if capture else 1)
    return EdgeScores(
        graph.edges,
        scores,
        {"forward": data + len(points), "backward": len(points)},
        method=method,
        details=details,
    )


def _recorded_senders(engine: EdgeEngine, recorded: dict[str, Tensor]) -> dict[Node, Tensor]:
    """Sender outputs (with each head's bias share) from the activations a clean pass recorded."""
    model, cfg = engine.model, engine.model.cfg
    out: dict[Node, Tensor] = {}
    embed = recorded[Site(SiteKind.EMBED).name]
    for n in engine.graph.senders_all:
        if n.kind is NodeKind.EMBED:
            out[n] = embed
        elif n.kind is NodeKind.POS_EMBED:
            out[n] = recorded[Site(SiteKind.POS_EMBED).name].expand_as(embed)
        elif n.kind is NodeKind.HEAD:
            result = recorded[Site(SiteKind.RESULT, n.layer).name][:, :, n.head]
            out[n] = result + model.blocks[n.layer].attn.b_O / cfg.n_heads  # type: ignore[index]
        else:
            out[n] = recorded[Site(SiteKind.MLP_OUT, n.layer).name]
    return out


def _delta(plan: _Layout, corrupt: dict[Node, Tensor], clean: dict[Node, Tensor]) -> Tensor:
    """[senders, batch, pos, d_model]: corrupted minus clean output of every sender."""
    return torch.stack([(corrupt[n] - clean[n]).expand_as(clean[n]) for n in plan.senders])


def eap(
    model: Transformer, task: DiscoveryTask, *, engine: EdgeEngine | None = None, batch_size: int = 64
) -> EdgeScores:
    """EAP: the gradient at the clean run (one corrupted forward, one clean forward + backward per batch of
    ``batch_size`` examples); see the module docstring."""
    return _score(model, task, [_Point()], engine=engine, batch_size=batch_size, method="eap", details={})


def eap_ig(
    model: Transformer,
    task: DiscoveryTask,
    steps: int = 5,
    *,
    variant: Literal["inputs", "activations"] = "inputs",
    rule: Literal["left", "right", "midpoint"] | None = None,
    engine: EdgeEngine | None = None,
    batch_size: int = 64,
) -> EdgeScores:
    """EAP-IG with ``steps`` interpolation points (MIB's default 5): ``variant="inputs"`` interpolates the
    token embedding between the corrupted and the clean input, ``"activations"`` each sender group's output
    in turn; see the module docstring. ``rule``: where the points sit on the path from corrupted (0) to clean
    (1): ``"left"`` ``k/m, k = 0..m-1`` (MIB's inputs variant, the default for it), ``"right"`` ``k/m, k =
    1..m`` (MIB's activations variant, the default for it; with one step this is EAP's clean point),
    ``"midpoint"`` ``(k + 1/2)/m`` (error ``O(1/m^2)`` instead of ``O(1/m)``). ``batch_size``: rows per
    forward (examples x points)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if variant not in ("inputs", "activations"):
        raise ValueError(f"unknown EAP-IG variant {variant!r}; valid: 'inputs', 'activations'")
    rule = rule or ("left" if variant == "inputs" else "right")
    shift = {"left": 0.0, "right": 1.0, "midpoint": 0.5}.get(rule)
    if shift is None:
        raise ValueError(f"unknown rule {rule!r}; valid: 'left', 'right', 'midpoint'")
    alphas = [(k + shift) / steps for k in range(steps)]
    if variant == "inputs":
        if isinstance(task.corrupt, Ablation):
            raise ValueError(
                f"EAP-IG-inputs interpolates towards corrupted inputs; task {task.name!r} ablates "
                f"({task.corrupt.value}): use variant='activations' or corrupted rows"
            )
        points = [_Point(group=0, alpha=a) for a in alphas]
        method = Attribution.EAP_IG.value
    else:
        points = [_Point(group=g, alpha=a) for g in range(len(_groups(model.cfg))) for a in alphas]
        method = Attribution.EAP_IG_ACTIVATIONS.value
    return _score(
        model,
        task,
        points,
        engine=engine,
        batch_size=batch_size,
        method=method,
        details={"steps": steps, "variant": variant, "rule": rule},
    )


def clean_corrupted(
    model: Transformer, task: DiscoveryTask, *, engine: EdgeEngine | None = None, batch_size: int = 64
) -> EdgeScores:
    """The mean of the gradients at the clean and at the corrupted run; see the module docstring."""
    points = [_Point(), _Point(corrupted_rows=True)]
    return _score(
        model,
        task,
        points,
        engine=engine,
        batch_size=batch_size,
        method=Attribution.CLEAN_CORRUPTED.value,
        details={},
    )


def attribute(
    model: Transformer,
    task: DiscoveryTask,
    method: Attribution | str = Attribution.EAP_IG,
    *,
    steps: int = 5,
    engine: EdgeEngine | None = None,
    batch_size: int = 64,
) -> EdgeScores:
    """Any method of this module by name (`Attribution`: ``eap``, ``eap-ig``, ``eap-ig-activations``,
    ``clean-corrupted``); ``steps`` is used by the EAP-IG variants."""
    try:
        method = Attribution(method)
    except ValueError:
        raise ValueError(
            f"unknown attribution method {method!r}; valid: {', '.join(m.value for m in Attribution)}"
        ) from None
    if method is Attribution.EAP:
        return eap(model, task, engine=engine, batch_size=batch_size)
    if method is Attribution.CLEAN_CORRUPTED:
        return clean_corrupted(model, task, engine=engine, batch_size=batch_size)
    variant: Literal["inputs", "activations"] = "inputs" if method is Attribution.EAP_IG else "activations"
    return eap_ig(model, task, steps, variant=variant, engine=engine, batch_size=batch_size)


def scores_circuit(
    engine: EdgeEngine, task: DiscoveryTask, scores: EdgeScores, k: int, *, absolute: bool = True
) -> Circuit:
    """The ``k`` best edges of ``scores`` (by ``|score|``, or importance with ``absolute=False``) as a
    `Circuit` with its faithfulness."""
    keep = scores.top(k, absolute=absolute)
    return Circuit(
        edges=tuple(e.name for e in engine.graph.edges if e in keep),
        method=scores.method,
        task=task.name,
        faithfulness=faithfulness(engine, task, keep),
        n_edges_total=len(engine.graph.edges),
        scores=dict(scores.ranked()),
        layout=layout(engine.graph),
        details={"k": k, "passes": scores.passes, **scores.details},
    )


def eap_circuit(
    model: Transformer, task: DiscoveryTask, k: int = 20, *, engine: EdgeEngine | None = None
) -> Circuit:
    """The ``k`` edges with the largest absolute EAP scores, as a `Circuit` with its faithfulness."""
    engine = engine or task.engine(model)
    return scores_circuit(engine, task, eap(model, task, engine=engine), k)


__all__ = [
    "Attribution",
    "EdgeScores",
    "ScoreSign",
    "attribute",
    "clean_corrupted",
    "eap",
    "eap_circuit",
    "eap_ig",
    "scores_circuit",
]
