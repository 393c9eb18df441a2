"""Interventions: in the planted model the measured change equals the graph's prediction in both the replacement
model and the real model; a small scaling agrees to first order on a random model; no change changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.graphs.attribution import attribute
from interplab.graphs.interventions import Intervention, intervene, predict, supernode
from tests.graphs.helpers import random_clt, variant_model
from tests.graphs.planted import BOS, A, B, C, D, exact_transcoder, planted_model

PROMPT = torch.tensor([BOS, A, D, C])


@pytest.mark.parametrize("mode", ["replacement", "model"])
def test_planted_scaling_matches_the_prediction(mode):
    model = planted_model()
    clt = exact_transcoder(model)
    graph = attribute(model, clt, PROMPT, targets=[B])
    result = intervene(model, clt, PROMPT, [Intervention(0, 1, 0, scale=1.5)], mode=mode, graph=graph)
    p = math.exp(8) / (math.exp(8) + 3)
    expected = 0.5 * p * (1 - 1 / 6)  # half as much e1 again, moved and read out
    torch.testing.assert_close(
        result.actual, torch.tensor([expected], dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(result.predicted, result.actual, atol=1e-5, rtol=1e-5)
    # clamping the last feature to 0 removes its whole effect on B
    off = intervene(model, clt, PROMPT, [Intervention(1, 3, 0, value=0.0)], mode=mode, graph=graph)
    torch.testing.assert_close(
        off.actual, torch.tensor([-p * (1 - 1 / 6)], dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(off.predicted, off.actual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["replacement", "model"])
def test_no_change_changes_nothing(mode):
    model = variant_model("gpt2")
    clt = random_clt(model)
    tokens = torch.randint(0, 23, (6,))
    graph = attribute(model, clt, tokens, targets=3)
    f = graph.nodes[0]
    result = intervene(
        model, clt, tokens, [Intervention(f.layer, f.position, f.feature, scale=1.0)], mode=mode, graph=graph
    )
    torch.testing.assert_close(result.after, result.before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.predicted, torch.zeros(3, dtype=torch.float64))


def test_small_scaling_agrees_to_first_order_in_the_replacement_model():
    model = variant_model("gpt2").double()
    clt = random_clt(model).double()
    tokens = torch.randint(0, 23, (6,))
    graph = attribute(model, clt, tokens, targets=3)
    nodes = graph.nodes[: graph.n_features]
    checked = 0
    for f in nodes[:6]:
        r = intervene(
            model, clt, tokens, [Intervention(f.layer, f.position, f.feature, scale=1.001)], graph=graph
        )
        torch.testing.assert_close(r.actual, r.predicted, atol=1e-9, rtol=1e-3)
        checked += 1
    assert checked == 6
    group = supernode([(f.layer, f.position, f.feature) for f in nodes[:3]], scale=1.001)
    r = intervene(model, clt, tokens, group, graph=graph)
    torch.testing.assert_close(r.actual, r.predicted, atol=1e-9, rtol=1e-3)


def test_inactive_features_have_no_prediction_and_bad_input_is_refused():
    model = planted_model()
    clt = exact_transcoder(model)
    graph = attribute(model, clt, PROMPT, targets=[B])
    r = intervene(
        model, clt, PROMPT, [Intervention(0, 2, 3, value=1.0)], graph=graph
    )  # neuron 3: never active
    assert torch.isnan(predict(graph, r.interventions)).all()
    with pytest.raises(ValueError, match="exactly one of value"):
        Intervention(0, 1, 0)
    with pytest.raises(ValueError, match="the CLT 4 features per layer"):
        intervene(model, clt, PROMPT, [Intervention(0, 1, 9, value=1.0)], graph=graph)
    assert Intervention.parse("1:3:0*0.5") == Intervention(1, 3, 0, scale=0.5)
    assert Intervention.parse("0:1:2=3") == Intervention(0, 1, 2, value=3.0)
    with pytest.raises(ValueError, match="LAYER:POS:FEATURE"):
        Intervention.parse("0:1=3")


def test_result_plots_and_saves(tmp_path):
    model = planted_model()
    clt = exact_transcoder(model)
    r = intervene(model, clt, PROMPT, [Intervention(0, 1, 0, scale=0.0)], targets=[B, C])
    fig = r.plot()
    assert [t.name for t in fig.data] == ["measured", "graph's prediction"]
    path = r.save(tmp_path / "r.json")
    import json

    doc = json.loads(path.read_text())
    assert doc["type"] == "InterventionResult" and len(doc["actual"]) == 2
