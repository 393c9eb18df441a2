"""interplab's EAP and circuit faithfulness against auto-circuit 1.0.1 (Miller et al. 2024) on the same model and
inputs. auto-circuit runs in its own interpreter (``INTERPLAB_AUTOCIRCUIT_PYTHON`` or ``.peers/autocircuit``,
built by ``bash scripts/peers.sh autocircuit``); without it these tests skip saying so, and fail under
``INTERPLAB_REQUIRE_PEERS=1`` (CI).

Both sides run the random models in float64 (auto-circuit's patch masks take the model's dtype), so scores differ
only by the order of float64 sums: measured relative differences are below 4e-13, the tolerance is rtol 1e-10
with an atol of 1e-12 of the largest score (for scores that are sums of far larger terms of both signs).
auto-circuit's ``run_circuits`` sets its masks with ``.float()``, so it runs circuits in float32 only: circuit
outputs are compared with interplab's float32 model at rtol 1e-5, atol 1e-5 (logit differences of order 1; the
measured differences are below 1.5e-6, a few float32 ulps of the logits).

Graph mapping (tests/autocircuit_peer.py): auto-circuit's single input node ``Resid Start`` (token plus position
embedding) is interplab's ``embed`` plus ``pos_embed``; its edge ``Resid Start->X`` scores the sum of interplab's
two edges into X. Clean and corrupt rows have the same positions, so every ``pos_embed`` score is exactly 0.
auto-circuit's score is the mask gradient of *minus* the logit difference, interplab's the change of the metric
(plus the logit difference): the signs are opposite.
"""

from __future__ import annotations

import copy

import pytest
import torch

from interplab.circuits import ComponentGraph, EdgeEngine, NodeKind, eap
from interplab.circuits.circuit import circuit_spec
from interplab.model import ModelConfig, Transformer
from interplab.model.config import Activation, Norm
from tests.autocircuit_peer import (
    autocircuit_edge,
    input_edges,
    interplab_edges,
    logit_diff_task,
    merged_scores,
    prepare,
    run_specs,
)
from tests.peers import peer_python

CONFIGS = {
    "mlp": dict(d_model=32, n_layers=2, n_heads=4, d_vocab=24, n_ctx=10),
    "attn_only": dict(d_model=24, n_layers=3, n_heads=2, d_vocab=24, n_ctx=10, attn_only=True),
    "parallel_rms_relu": dict(
        d_model=24,
        n_layers=2,
        n_heads=3,
        d_vocab=24,
        n_ctx=10,
        parallel_attn_mlp=True,
        normalization=Norm.RMSNORM,
        act_fn=Activation.RELU,
    ),
}
N, POS = 8, 9
COUNTS = (0, 1, 5, 20, 40)  # below each model's number of nonzero scores (no ties)


def _model(kind: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIGS[kind], init_range=0.2)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():  # biases and norm weights away from 0 and 1, so no term hides
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif ".b" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 24, (N, POS), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2:6] = torch.randint(0, 24, (N, 4), generator=gen)  # the counterfactual changes 4 positions
    answers = torch.randint(0, 24, (N, 1), generator=gen)
    wrong = (answers + 1 + torch.randint(0, 22, (N, 1), generator=gen)) % 24
    return {"clean": clean, "corrupt": corrupt, "answers": answers, "wrong_answers": wrong}


@pytest.fixture(scope="module")
def peers(tmp_path_factory) -> dict[str, dict]:
    """auto-circuit's results on every model, from one process (its import takes ~15 s)."""
    python = peer_python("autocircuit")
    root = tmp_path_factory.mktemp("autocircuit")
    specs = [
        prepare(
            _model(kind), _data(), root / kind, methods=[{"name": "eap"}], edge_counts=COUNTS, dtype="float64"
        )
        for kind in sorted(CONFIGS)
    ]
    return dict(zip(sorted(CONFIGS), run_specs(python, specs), strict=True))


@pytest.fixture(params=sorted(CONFIGS))
def case(request, peers):
    data = _data()
    task = logit_diff_task("random", data["clean"], data["corrupt"], data["answers"], data["wrong_answers"])
    return _model(request.param), data, task, peers[request.param]


def test_same_graph(case):
    """Every auto-circuit edge is an interplab edge (or an embed/pos_embed pair), and nothing else exists."""
    model, _, _, peer = case
    graph = ComponentGraph.from_model(model)
    assert sorted({autocircuit_edge(e.name) for e in graph.edges}) == peer["edges"]
    assert len(graph.edges) == peer["n_edges"] + len(input_edges(graph)) // 2


def test_eap_scores_equal(case):
    model, _, task, peer = case
    scores = eap(model, task)
    pos = [i for i, e in enumerate(scores.edges) if e.sender.kind is NodeKind.POS_EMBED]
    assert pos and bool((scores.scores[pos] == 0).all())  # same positions: no positional difference
    ours = merged_scores(scores)
    theirs = peer["methods"]["eap"]["scores"]
    names = peer["edges"]
    a = torch.tensor([ours[n] for n in names], dtype=torch.float64)
    b = -torch.tensor([theirs[n] for n in names], dtype=torch.float64)
    assert a.abs().max() > 1e-3  # the scores are not all vanishing
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * float(a.abs().max()))


def test_circuit_outputs_equal(case):
    """auto-circuit's TREE_PATCH circuits (every edge outside carries the corrupt run's value) and interplab's
    patched model give the same logit differences, for the same edge sets (taken from auto-circuit's own top-k
    by |score|), from the empty circuit to 40 edges; the top-k sets themselves agree."""
    model, data, task, peer = case
    engine = EdgeEngine(model, task.tokens)
    graph = engine.graph
    full = task.metric(engine.run(circuit_spec(engine, task, set(graph.edges))), task.clean)
    torch.testing.assert_close(full, torch.tensor(peer["full"], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    engine = EdgeEngine(copy.deepcopy(model).float(), task.tokens)
    ranked = sorted(merged_scores(eap(model, task)).items(), key=lambda kv: -abs(kv[1]))
    for count in COUNTS:
        circuit = peer["methods"]["eap"]["circuits"][str(count)]
        keep = interplab_edges(graph, circuit["edges"])
        ours = task.metric(engine.run(circuit_spec(engine, task, keep)), task.clean)
        theirs = torch.tensor(circuit["logit_diff"])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        if count:
            assert len(circuit["edges"]) == count  # no ties at these sizes
            assert {n for n, _ in ranked[:count]} == set(circuit["edges"])
    empty = peer["methods"]["eap"]["circuits"]["0"]["logit_diff"]
    corrupted = engine.run(circuit_spec(engine, task, set()))
    torch.testing.assert_close(task.metric(corrupted, task.clean), torch.tensor(empty), rtol=1e-5, atol=1e-5)
    del data
