"""Pruning keeps exactly the planted path; influence equals its closed form; the scores of an exact
transcoder are 1 and fall with error nodes."""

from __future__ import annotations

import torch

from interplab.graphs.attribution import attribute
from interplab.graphs.prune import find_threshold, graph_scores, influence, normalize_rows, prune_graph
from tests.graphs.helpers import random_clt, variant_model
from tests.graphs.planted import BOS, A, B, C, D, exact_transcoder, planted_model

PROMPT = torch.tensor([BOS, A, D, C])


def test_pruning_keeps_exactly_the_planted_path():
    model = planted_model()
    graph = attribute(model, exact_transcoder(model), PROMPT, targets=[B])
    pruned = prune_graph(graph)
    kept = {i for i in range(len(graph.nodes)) if pruned.node_mask[i]}
    f0, f1 = graph.feature_index(0, 1, 0), graph.feature_index(1, 3, 0)
    tokens = set(range(graph.token_slice.start, graph.token_slice.stop))
    logit = graph.logit_slice.start
    assert kept == {f0, f1, logit} | tokens  # tokens and logits are always kept
    edges = {(int(i), int(j)) for i, j in torch.nonzero(pruned.edge_mask)}
    assert edges == {(f0, graph.token_index(1)), (f1, f0), (logit, f1)}
    assert graph_scores(graph) == {"replacement": 1.0, "completeness": 1.0}


def test_influence_is_the_neumann_series():
    model = variant_model("gpt2")
    graph = attribute(model, random_clt(model, d_sae=8), torch.randint(0, 23, (6,)), targets=3)
    n = normalize_rows(graph.adjacency).double()
    w = graph.logit_weights.double()
    closed = w @ (torch.linalg.inv(torch.eye(len(w), dtype=n.dtype) - n) - torch.eye(len(w), dtype=n.dtype))
    torch.testing.assert_close(influence(n, w), closed)
    scores = graph_scores(graph)
    assert 0 < scores["replacement"] < 1 and 0 < scores["completeness"] < 1
    # by hand: tokens' and errors' influence
    tok, err = closed[graph.token_slice].sum(), closed[graph.error_slice].sum()
    assert abs(scores["replacement"] - float(tok / (tok + err))) < 1e-5


def test_find_threshold_and_masks():
    scores = torch.tensor([0.5, 0.125, 0.25, 0.125])  # cumulative in order: 0.5, 0.75, 0.875, 1
    assert float(find_threshold(scores, 0.75)) == 0.25  # reached exactly: that score
    assert float(find_threshold(scores, 0.8)) == 0.125
    assert float(find_threshold(scores, 1.0)) == 0.125
    model = variant_model("gpt2")
    graph = attribute(model, random_clt(model, d_sae=8), torch.randint(0, 23, (6,)), targets=3)
    pruned = prune_graph(graph, node_threshold=0.5, edge_threshold=0.9)
    everything = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0)
    assert pruned.n_nodes < everything.n_nodes and pruned.n_edges < everything.n_edges
    # every kept edge joins kept nodes; every kept feature has an edge in and an edge out
    assert not pruned.edge_mask[~pruned.node_mask].any() and not pruned.edge_mask[:, ~pruned.node_mask].any()
    for i in torch.nonzero(pruned.node_mask[: graph.n_features]).flatten():
        assert pruned.edge_mask[i].any() and pruned.edge_mask[:, i].any()


def _full_sort_threshold(scores, fraction):  # circuit-tracer's rule, sorting every score
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    return ordered[min(int(torch.searchsorted(cumulative, fraction)), len(ordered) - 1)]


def test_find_threshold_sorting_only_the_nonzero_scores_is_the_full_sort():
    g = torch.Generator().manual_seed(3)
    for density in (0.05, 0.5, 1.0):
        scores = torch.rand(2000, generator=g, dtype=torch.float64) * (
            torch.rand(2000, generator=g) < density
        )
        for fraction in (0.0, 0.5, 0.8, 0.98, 1.0):
            assert float(find_threshold(scores, fraction)) == float(_full_sort_threshold(scores, fraction))
