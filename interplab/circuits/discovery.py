"""Automatic circuit discovery: edge attribution patching (EAP) and ACDC.

- `eap` (Syed, Rager, Conmy 2023) scores every edge at once with a first-order estimate of the metric change
  when the edge is corrupted: ``(sender_corrupt - sender_clean) . d metric / d receiver_input``, from one
  forward and one backward pass on the clean inputs (plus one forward on the corrupted inputs for their
  activations).
- `acdc` (Conmy et al. 2023) visits receivers from the output backwards and removes (corrupts) each incoming
  edge whose removal raises KL(full model || current circuit) by less than ``threshold``; removals are kept.

Both return a `Circuit` with its faithfulness: the metric of the model with every edge outside the circuit
patched from the corrupted inputs, relative to the full and the fully corrupted model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from interplab.circuits.circuit import Circuit, DiscoveryTask, circuit_spec, faithfulness, kl_from, layout
from interplab.circuits.engine import Ablation, EdgeEngine, Spec
from interplab.circuits.graph import Edge, NodeKind, Slot
from interplab.circuits.split import kv_per_query_head, post_norm_jvp
from interplab.hooks.site import Site, SiteKind
from interplab.model.config import ModelConfig, Positional
from interplab.model.transformer import Transformer


@dataclass(frozen=True)
class EdgeScores:
    """EAP scores of every edge (estimated change of the mean metric when that edge alone is corrupted)."""

    edges: tuple[Edge, ...]
    scores: Tensor
    passes: dict[str, int]
    """forward and backward passes used"""

    def ranked(self) -> list[tuple[str, float]]:
        """Edges by decreasing absolute score."""
        order = torch.argsort(self.scores.abs(), descending=True)
        return [(self.edges[i].name, float(self.scores[i])) for i in order.tolist()]

    def top(self, k: int) -> set[Edge]:
        order = torch.argsort(self.scores.abs(), descending=True)[:k]
        return {self.edges[i] for i in order.tolist()}


def _sender_hooks(cfg: ModelConfig) -> list[str]:
    names = [Site(SiteKind.EMBED).name]
    if cfg.positional is Positional.LEARNED:
        names.append(Site(SiteKind.POS_EMBED).name)
    for layer in range(cfg.n_layers):
        names.append(Site(SiteKind.RESULT, layer).name)
        if cfg.has_mlp:
            names.append(Site(SiteKind.MLP_OUT, layer).name)
    return names


def _senders(engine: EdgeEngine, acts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sender outputs by node name (head results without their bias share: it cancels in differences)."""
    out = {}
    embed = acts[Site(SiteKind.EMBED).name]
    for n in engine.graph.senders_all:
        if n.kind is NodeKind.EMBED:
            out[n.name] = embed
        elif n.kind is NodeKind.POS_EMBED:
            out[n.name] = acts[Site(SiteKind.POS_EMBED).name].expand_as(embed)
        elif n.kind is NodeKind.HEAD:
            out[n.name] = acts[Site(SiteKind.RESULT, n.layer).name][:, :, n.head]
        else:
            out[n.name] = acts[Site(SiteKind.MLP_OUT, n.layer).name]
    return out


_SLOT_INPUT = {Slot.Q: SiteKind.Q_INPUT, Slot.K: SiteKind.K_INPUT, Slot.V: SiteKind.V_INPUT}
"""the site of each attention slot's per-head input (an MLP's input, `Slot.IN`, is ``hook_mlp_in``)"""


def eap(model: Transformer, task: DiscoveryTask, *, engine: EdgeEngine | None = None) -> EdgeScores:
    """Score every edge with one clean forward + backward (and one corrupted forward); see the module docstring."""
    engine = engine or task.engine(model)
    cfg = model.cfg
    model = kv_per_query_head(
        model
    )  # GQA: hook_k_input / hook_v_input with one copy per query head (its slot)
    rows = task.clean
    mask = None if task.attention_mask is None else task.attention_mask[rows]
    names = _sender_hooks(cfg)
    if isinstance(task.corrupt, Ablation):
        if task.corrupt is Ablation.ZERO:
            corrupt = {n.name: torch.zeros(()) for n in engine.graph.senders_all}
        else:
            corrupt = {n.name: engine.mean_output(n) for n in engine.graph.senders_all}
        passes = {"forward": 1, "backward": 1}
    else:
        cmask = None if task.attention_mask is None else task.attention_mask[task.corrupt]
        with torch.no_grad():
            _, cache = model.run_with_cache(engine.tokens[task.corrupt], names, attention_mask=cmask)
        corrupt = _senders(engine, {k: cache[k] for k in names})
        passes = {"forward": 2, "backward": 1}
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def keep(t: Tensor, site) -> None:
        acts[site.name] = t.detach()

    def keep_grad(g: Tensor, site) -> None:
        grads[site.name] = g.detach()

    slots: dict[tuple[Slot, int | None], str] = {
        (slot, layer): Site(kind, layer).name
        for layer in range(cfg.n_layers)
        for slot, kind in _SLOT_INPUT.items()
    }
    if cfg.has_mlp:
        slots |= {(Slot.IN, layer): Site(SiteKind.MLP_IN, layer).name for layer in range(cfg.n_layers)}
    final = Site(SiteKind.RESID_POST, cfg.n_layers - 1).name
    with (
        torch.enable_grad(),
        model.hooks([(n, keep) for n in names], [(n, keep_grad) for n in [*slots.values(), final]]),
    ):
        logits = model(engine.tokens[rows], attention_mask=mask)
        task.metric(logits, rows).mean().backward()
    clean = _senders(engine, acts)
    deltas = {name: corrupt[name] - clean[name] for name in clean}
    if (
        cfg.post_norms
    ):  # a head's change reaches every receiver through its layer's post-norm (to first order)
        for layer in range(cfg.n_layers):
            heads = [n.name for n in engine.graph.senders_all if n.kind is NodeKind.HEAD and n.layer == layer]
            result = acts[Site(SiteKind.RESULT, layer).name]
            stacked = torch.stack([deltas[h].expand_as(clean[h]) for h in heads], dim=2)
            normed = post_norm_jvp(model, layer, result, stacked)
            deltas |= {h: normed[:, :, i] for i, h in enumerate(heads)}
    scores = []
    for edge in engine.graph.edges:
        r = edge.receiver
        if r.kind is NodeKind.HEAD:
            g = grads[slots[(edge.slot, r.layer)]][:, :, r.head]
        elif r.kind is NodeKind.MLP:
            g = grads[slots[(Slot.IN, r.layer)]]
        else:
            g = grads[final]
        delta = deltas[edge.sender.name]
        scores.append((delta * g).sum())  # the metric is a batch mean: gradients carry the 1/b
    return EdgeScores(engine.graph.edges, torch.stack(scores), passes)


def eap_circuit(
    model: Transformer, task: DiscoveryTask, k: int = 20, *, engine: EdgeEngine | None = None
) -> Circuit:
    """The ``k`` edges with the largest absolute EAP scores, as a `Circuit` with its faithfulness."""
    engine = engine or task.engine(model)
    scores = eap(model, task, engine=engine)
    keep = scores.top(k)
    return Circuit(
        edges=tuple(e.name for e in engine.graph.edges if e in keep),
        method="eap",
        task=task.name,
        faithfulness=faithfulness(engine, task, keep),
        n_edges_total=len(engine.graph.edges),
        scores={name: s for name, s in scores.ranked()},
        layout=layout(engine.graph),
        details={"k": k, "passes": scores.passes},
    )


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


__all__ = ["EdgeScores", "acdc", "circuit_spec", "eap", "eap_circuit"]
