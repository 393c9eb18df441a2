"""Pruning an attribution graph by cumulative influence on the targets, and its replacement and
completeness scores (circuit-tracer 0.5's definitions).

With ``N`` the adjacency's absolute values, each row divided by its sum (the fraction of a target's input that
comes from each source) and ``w`` the targets' weights on the logit nodes, a node's influence is
``w (N + N^2 + ...)`` (the graph is a DAG, so the series ends). `prune_graph` keeps the nodes that carry
``node_threshold`` of the total influence (tokens and logits always), then the edges that carry
``edge_threshold`` of the edge influence (normalised edge times its target's influence plus weight), then drops,
until nothing changes, features and errors without a kept outgoing edge and features without a kept incoming
edge.

>>> from interplab.graphs import attribute
>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> graph = attribute(model, clt, tokens[0], targets=3)
>>> pruned = prune_graph(graph)
>>> pruned.n_nodes <= len(graph.nodes), sorted(graph_scores(graph))
(True, ['completeness', 'replacement'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor

if TYPE_CHECKING:
    from interplab.graphs.attribution import AttributionGraph


def normalize_rows(adjacency: Float[Tensor, "node node"]) -> Float[Tensor, "node node"]:
    """``|A|`` with each row divided by its sum (rows without input stay zero)."""
    return _normalize_(adjacency.abs())


def _normalize_(a: Tensor) -> Tensor:
    """``a`` (non-negative) with each row divided by its sum, in place (no copy of the square matrix)."""
    return a.div_(a.sum(dim=1, keepdim=True).clamp(min=1e-10))


def influence(
    normalized: Float[Tensor, "node node"], weights: Float[Tensor, " node"]
) -> Float[Tensor, " node"]:
    """``w N + w N^2 + ...``: each node's total (indirect included) influence on the weighted targets."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(len(weights) + 1):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise RuntimeError("the influence series did not end: the adjacency has a cycle (it must be a DAG)")


def find_threshold(scores: Float[Tensor, " n"], fraction: float) -> Tensor:
    """The score at which the highest scores reach ``fraction`` of their total (keep ``scores >= it``): the
    first in descending order whose cumulative share reaches it (the last when none does). Only the nonzero
    scores are sorted (an adjacency is mostly zeros); a zero threshold comes out where the zeros would."""
    nonzero = scores[scores != 0]
    if nonzero.numel() == 0:
        return scores.new_zeros(())
    ordered = torch.sort(nonzero, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)))
    if index < len(ordered):
        return ordered[index]
    return scores.new_zeros(()) if nonzero.numel() < scores.numel() else ordered[-1]


@dataclass(frozen=True)
class PrunedGraph:
    """Which nodes and edges of a graph the pruning kept, and each node's cumulative influence (the fraction
    of the total influence of the nodes at least as influential: small = important)."""

    node_mask: Bool[Tensor, " node"]
    edge_mask: Bool[Tensor, "node node"]
    """``edge_mask[target, source]``"""
    cumulative_influence: Float[Tensor, " node"]
    node_threshold: float
    edge_threshold: float

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())


def prune_graph(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> PrunedGraph:
    """Prune ``graph`` (see the module docstring); thresholds are fractions of influence in [0, 1]."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    A = graph.adjacency
    w = graph.logit_weights
    n_fixed = graph.n_pos + graph.n_logits  # tokens and logits: always kept
    n_feat = graph.n_features
    node_influence = influence(normalize_rows(A), w)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[len(w) - n_fixed :] = True

    # one square copy of the adjacency: masked, made absolute, normalised and scaled in place
    edge_scores = A.abs()
    edge_scores[~node_mask] = 0
    edge_scores[:, ~node_mask] = 0
    normalized = _normalize_(edge_scores)
    edge_scores = normalized.mul_((influence(normalized, w) + w)[:, None])
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)
    del edge_scores, normalized

    inner = slice(0, len(w) - n_fixed)  # features and errors
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[inner] &= edge_mask[:, inner].any(0)  # an outgoing edge
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)  # features: an incoming edge
        if torch.equal(node_mask, before):
            break
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False

    ordered, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = torch.cumsum(ordered, dim=0) / ordered.sum()
    return PrunedGraph(node_mask, edge_mask, cumulative, node_threshold, edge_threshold)


def graph_scores(graph: AttributionGraph) -> dict[str, float]:
    """On the unpruned graph: ``replacement``, the tokens' share of the influence that tokens and errors have
    (1: every path from the input to the targets runs through features), and ``completeness``, each node's
    non-error fraction of its input weighted by its influence plus weight (partial credit)."""
    w = graph.logit_weights
    normalized = normalize_rows(graph.adjacency)
    node_influence = influence(normalized, w)
    tokens = node_influence[graph.token_slice].sum()
    errors = node_influence[graph.error_slice].sum()
    replacement = tokens / (tokens + errors)
    non_error = 1 - normalized[:, graph.error_slice].sum(dim=-1)
    weight = node_influence + w
    completeness = (non_error * weight).sum() / weight.sum()
    return {"replacement": float(replacement), "completeness": float(completeness)}
