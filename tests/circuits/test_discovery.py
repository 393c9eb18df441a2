"""EAP and ACDC find the circuit planted in a hand-built model."""

import pytest
import torch

from interplab.circuits.circuit import DiscoveryTask
from interplab.circuits.discovery import acdc, eap, eap_circuit
from interplab.circuits.engine import EdgeEngine, Spec
from interplab.circuits.patching import patch_edges
from interplab.circuits.planted import PLANTED_EDGES, induction_data, planted_induction


def make_task(metric_kind="logprob"):
    tokens, labels, _ = induction_data(240)
    rows = torch.arange(120)

    def metric(logits, r):
        last = logits[:, -1].float()
        if metric_kind == "logit":
            return last[torch.arange(r.numel()), labels[r]]
        return last.log_softmax(-1)[torch.arange(r.numel()), labels[r]]

    return DiscoveryTask(name="planted", tokens=tokens, clean=rows, corrupt=rows + 120, metric=metric)


@pytest.fixture(scope="module")
def model():
    return planted_induction()


def test_eap_ranks_the_planted_edges_first(model):
    scores = eap(model, make_task())
    ranked = scores.ranked()
    assert {name for name, _ in ranked[: len(PLANTED_EDGES)]} == set(PLANTED_EDGES)
    assert scores.passes == {"forward": 2, "backward": 1}
    assert len(ranked) == len(EdgeEngine(model, torch.zeros(1, 10, dtype=torch.long)).graph.edges)


def test_eap_is_exact_for_edges_into_a_linear_readout(model):
    # no final norm and a metric linear in the logits: the first-order estimate is the true patch effect
    task = make_task("logit")
    engine = EdgeEngine(model, task.tokens)
    scores = dict(eap(model, task, engine=engine).ranked())
    base = task.metric(engine.run(Spec(task.clean)), task.clean)
    for name in ("a1.0->logits", "a1.1->logits", "embed->logits"):
        patched = task.metric(patch_edges(engine, task.clean, {name: task.corrupt}), task.clean)
        torch.testing.assert_close(torch.tensor(scores[name]), (patched - base).mean(), atol=1e-4, rtol=1e-4)


def test_acdc_recovers_exactly_the_planted_edges(model):
    circuit = acdc(model, make_task(), threshold=0.1)
    assert set(circuit.edges) == set(PLANTED_EDGES)
    torch.testing.assert_close(circuit.faithfulness.fraction, 1.0, atol=0.01, rtol=0)
    assert circuit.faithfulness.kl < 0.01


def test_a_circuit_without_a_planted_edge_is_unfaithful(model):
    circuit = eap_circuit(model, make_task(), k=len(PLANTED_EDGES) - 1)
    assert circuit.faithfulness.fraction < 0.5  # every planted edge is needed: one missing breaks the copy


def test_circuit_report_files(model, tmp_path):
    circuit = eap_circuit(model, make_task(), k=len(PLANTED_EDGES))
    assert set(circuit.edges) == set(PLANTED_EDGES)
    circuit.save(tmp_path / "c")
    page = (tmp_path / "c" / "report.html").read_text()
    assert "<svg" in page and "a0.0-&gt;a1.0.k" in page or "a0.0->a1.0.k" in page
    assert '"method": "eap"' in (tmp_path / "c" / "report.json").read_text()
    assert circuit.plot().data


def test_eap_with_zero_ablation_is_exact_for_a_linear_readout(model):
    from interplab.circuits import Ablation, DiscoveryTask

    base_task = make_task("logit")
    task = DiscoveryTask(
        name="zero",
        tokens=base_task.tokens,
        clean=base_task.clean,
        corrupt=Ablation.ZERO,
        metric=base_task.metric,
    )
    engine = EdgeEngine(model, task.tokens)
    scores = eap(model, task, engine=engine)
    assert scores.passes == {"forward": 1, "backward": 1}
    ranked = dict(scores.ranked())
    base = task.metric(engine.run(Spec(task.clean)), task.clean)
    patched = task.metric(patch_edges(engine, task.clean, {"a1.0->logits": Ablation.ZERO}), task.clean)
    torch.testing.assert_close(
        torch.tensor(ranked["a1.0->logits"]), (patched - base).mean(), atol=1e-4, rtol=1e-4
    )
