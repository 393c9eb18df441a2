"""Attribution graphs against ground truth: a planted circuit whose edges are known in closed form, a
hand-written reference of every direct effect, finite differences in the frozen replacement model, batched
rows equal to one row at a time, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.graphs.attribution import NodeKind, attribute, estimate_bytes
from interplab.graphs.replacement import ReplacementModel
from tests.graphs.helpers import random_clt, variant_model
from tests.graphs.planted import BOS, A, B, C, D, exact_transcoder, planted_model, reference_adjacency
from tests.model.model_variants import VARIANTS

PROMPT = torch.tensor([BOS, A, D, C])


def test_planted_edges_in_closed_form():
    model = planted_model()
    clt = exact_transcoder(model)
    graph = attribute(model, clt, PROMPT, targets=[B])
    assert graph.adjacency.shape == (len(graph.nodes), len(graph.nodes))
    f0 = graph.feature_index(0, 1, 0)
    f1 = graph.feature_index(1, 3, 0)
    logit = graph.logit_slice.start
    # the pattern of the last query on A's position: score 8 there, 0 on the other three keys
    p = math.exp(8) / (math.exp(8) + 3)
    a1 = p * 1.0
    assert graph.nodes[f0].value == pytest.approx(1.0)
    assert graph.nodes[f1].value == pytest.approx(a1, rel=1e-5)
    expected = {
        (f0, graph.token_index(1)): 1.0,  # A's embedding e0 . the encoder e0
        (f1, f0): p,  # e1 moved by the head into e3, read by neuron 0 of layer 1
        (logit, f1): a1 * (1 - 1 / 6),  # e4 . (W_U[:, B] - the mean column)
        # the queries at A's and D's positions see no e2: uniform patterns move e1/2 and e1/3, read by neuron
        # 0 of layer 1 there (features that reach no logit)
        (graph.feature_index(1, 1, 0), f0): 1 / 2,
        (graph.feature_index(1, 2, 0), f0): 1 / 3,
    }
    for (i, j), value in expected.items():
        assert float(graph.adjacency[i, j]) == pytest.approx(value, abs=1e-5)
    rest = graph.adjacency.clone()
    for i, j in expected:
        rest[i, j] = 0
    torch.testing.assert_close(rest, torch.zeros_like(rest), atol=1e-5, rtol=0)
    assert (graph.adjacency[:, graph.error_slice] == 0).all()  # the transcoder is exact


@pytest.mark.parametrize(
    "name",
    [
        "gpt2",
        "rotary_neox_rms_gated_gqa",
        "rotary_gptj_partial_parallel",
        "gemma_like",
        "qk_norm_local_global",
        "olmo_like",
    ],
)
@pytest.mark.parametrize("cross_layer", [True, False])
def test_edges_equal_the_hand_written_reference(name, cross_layer):
    model = variant_model(name)
    clt = random_clt(model, d_sae=6, cross_layer=cross_layer)
    tokens = torch.randint(0, model.cfg.d_vocab, (7,))
    graph = attribute(model, clt, tokens, targets=3)
    run = ReplacementModel(model, clt).run(tokens[None])
    ref = reference_adjacency(model, run, graph, clt)
    torch.testing.assert_close(graph.adjacency, ref, atol=1e-5, rtol=1e-4)
    assert graph.n_features > 5 and graph.adjacency[: graph.n_features].abs().sum() > 0


def test_exact_transcoder_of_a_layernorm_model_matches_the_reference():
    model = variant_model("gpt2").__class__(VARIANTS["gpt2"].replace(act_fn="relu"))
    from tests.model.model_variants import randomize

    randomize(model)
    clt = exact_transcoder(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (8,))
    run = ReplacementModel(model, clt).run(tokens[None])
    torch.testing.assert_close(run.errors, torch.zeros_like(run.errors), atol=1e-5, rtol=0)
    graph = attribute(model, clt, tokens, targets=4)
    torch.testing.assert_close(
        graph.adjacency, reference_adjacency(model, run, graph, clt), atol=1e-5, rtol=1e-4
    )


def test_edges_equal_finite_differences_in_the_frozen_replacement_model():
    """Scaling one feature's activation by (1 + eps), every other activation and every error held, changes each
    target's read-out by eps times the edge (exactly: the frozen forward is affine)."""
    model = variant_model("rotary_neox_rms_gated_gqa").double()  # float64: differences without cancellation
    clt = random_clt(model, d_sae=8).double()
    tokens = torch.randint(0, model.cfg.d_vocab, (6,))
    graph = attribute(model, clt, tokens, targets=2)
    rm = ReplacementModel(model, clt)
    run = rm.run(tokens[None])

    def readouts(acts):
        mlp = rm.decode(acts) + run.errors
        out = rm.forward(run.tokens, run.frozen, run.embed, lambda layer, _x: mlp[:, :, layer])
        vals = []
        for node in graph.nodes[: graph.n_features]:
            vals.append(
                out.feature_inputs[0, node.position, node.layer] @ clt.W_enc[node.layer][:, node.feature]
            )
        vals += [out.final[0, -1] @ t.vector for t in graph.targets]
        return torch.stack(vals)

    rows = list(range(graph.n_features)) + list(range(graph.logit_slice.start, len(graph.nodes)))
    eps = 0.5
    with torch.no_grad():
        base = readouts(run.acts)
        for j, node in enumerate(graph.nodes[: graph.n_features]):
            acts = run.acts.clone()
            acts[0, node.position, node.layer, node.feature] *= 1 + eps
            diff = (readouts(acts) - base) / eps
            torch.testing.assert_close(diff, graph.adjacency[rows, j], atol=1e-9, rtol=1e-9)


def test_batched_rows_equal_one_row_at_a_time():
    model = variant_model("gpt2")
    clt = random_clt(model, d_sae=10)
    tokens = torch.randint(0, model.cfg.d_vocab, (8,))
    one = attribute(model, clt, tokens, targets=3, batch_size=1)
    many = attribute(model, clt, tokens, targets=3, batch_size=256)
    torch.testing.assert_close(one.adjacency, many.adjacency, atol=1e-6, rtol=1e-5)
    assert one.nodes == many.nodes


def test_node_order_and_ids():
    model = planted_model()
    graph = attribute(model, exact_transcoder(model), PROMPT, targets=[B, C])
    kinds = [n.kind for n in graph.nodes]
    nf = graph.n_features
    assert kinds[:nf] == [NodeKind.FEATURE] * nf
    keys = [(n.layer, n.position, n.feature) for n in graph.nodes[:nf]]
    assert keys == sorted(keys) and all(n.position > 0 for n in graph.nodes[:nf])
    assert kinds[graph.error_slice] == [NodeKind.ERROR] * (2 * 4)
    assert [(n.layer, n.position) for n in graph.nodes[graph.error_slice]] == [
        (layer, p) for layer in range(2) for p in range(4)
    ]
    assert [n.feature for n in graph.nodes[graph.token_slice]] == PROMPT.tolist()
    assert [n.feature for n in graph.nodes[graph.logit_slice]] == [B, C]
    ids = graph.node_ids()
    assert ids[graph.feature_index(0, 1, 0)] == "0_0_1"
    assert ids[graph.error_index(1, 2)] == "1_-1_2"
    assert ids[graph.token_index(1)] == f"E_{A}_1"
    assert ids[graph.logit_slice.start] == f"3_{B}_3"
    assert len(set(ids)) == len(ids)


def test_targets_top_k_and_logit_diff():
    model = variant_model("gpt2")
    clt = random_clt(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (6,))
    probs = torch.softmax(model(tokens[None])[0, -1], -1)
    graph = attribute(model, clt, tokens, targets=3)
    assert [t.token for t in graph.targets] == probs.topk(3).indices.tolist()
    torch.testing.assert_close(torch.tensor([t.weight for t in graph.targets]), probs.topk(3).values)
    diff = attribute(model, clt, tokens, targets=("logit_diff", 3, 5))
    top = attribute(model, clt, tokens, targets=[3, 5])
    l3, l5 = top.logit_slice.start, top.logit_slice.start + 1
    n = diff.logit_slice.start  # the sources: every node but the logits
    torch.testing.assert_close(
        diff.adjacency[n, :n], top.adjacency[l3, :n] - top.adjacency[l5, :n], atol=1e-5, rtol=1e-4
    )


def test_max_feature_nodes_keeps_the_most_influential():
    model = planted_model()
    clt = exact_transcoder(model)
    graph = attribute(model, clt, PROMPT, targets=[B], max_feature_nodes=2)
    assert graph.n_features == 2
    assert {(n.layer, n.position, n.feature) for n in graph.nodes[:2]} == {(0, 1, 0), (1, 3, 0)}
    full = attribute(model, clt, PROMPT, targets=[B])
    i, j = graph.feature_index(1, 3, 0), graph.feature_index(0, 1, 0)
    assert float(graph.adjacency[i, j]) == pytest.approx(
        float(full.adjacency[full.feature_index(1, 3, 0), full.feature_index(0, 1, 0)])
    )


def test_refuses_targets_outside_the_vocabulary():
    model = planted_model()
    clt = exact_transcoder(model)
    with pytest.raises(ValueError, match=r"target token 6 is not in the vocabulary: valid ids are 0 .. 5"):
        attribute(model, clt, PROMPT, targets=[B, 6])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        attribute(model, clt, PROMPT, targets=("logit_diff", B, -1))


def test_refuses_a_prompt_over_the_memory_budget():
    model = variant_model("gpt2")
    clt = random_clt(model, d_sae=10)
    tokens = torch.randint(0, model.cfg.d_vocab, (12,))
    need = estimate_bytes(12, 100, 2, 16, 1, 1)
    with pytest.raises(
        MemoryError, match=r"a prompt of 12 tokens .* shorten the prompt to about \d+ tokens.*raise memory_gb"
    ):
        attribute(model, clt, tokens, targets=1, memory_gb=need / 2**30 / 50)
    # a budget that fits a smaller batch shrinks the batch instead
    graph = attribute(model, clt, tokens, targets=1, batch_size=4096, memory_gb=0.03)
    assert graph.meta["batch_size"] < 4096
