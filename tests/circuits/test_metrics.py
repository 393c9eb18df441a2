"""MIB's CPR/CMD: pruning, circuit selection, areas, and the curves on a planted circuit (the answer is known)."""

import json

import pytest
import torch

from interplab.circuits import EdgeEngine
from interplab.circuits.circuit import faithfulness
from interplab.circuits.eap import EdgeScores, ScoreSign, eap_ig
from interplab.circuits.graph import ComponentGraph
from interplab.circuits.metrics import MIB_FRACTIONS, CircuitMetrics, area, circuit_metrics, prune, top_edges
from interplab.circuits.planted import NOISE_EDGES, PLANTED_EDGES, planted_induction
from interplab.runs import Kind, read_json
from tests.circuits.discovery_tasks import planted_task


@pytest.fixture(scope="module")
def model():
    return planted_induction()


@pytest.fixture(scope="module")
def graph(model):
    return ComponentGraph.from_model(model)


def named(graph, *names):
    return {graph.edge(n) for n in names}


def test_prune_drops_unfed_and_unread_nodes_repeatedly(graph):
    chain = named(graph, "embed->a0.0.v", "a0.0->a1.0.k", "a1.0->logits")
    assert prune(chain) == chain
    # a1.1 is read by nothing; a0.1 is fed by nothing (a dangling sender); a1.0 loses its only output
    dangling = named(graph, "embed->a1.1.q", "a0.1->a1.0.v", "embed->a0.0.q", "a0.0->a1.0.q")
    assert prune(dangling) == set()
    # removing a1.0->logits leaves a0.0 and a1.0 with nothing downstream: the whole chain goes
    assert prune(chain - named(graph, "a1.0->logits")) == set()
    # a head fed through one slot only is kept (MIB counts any incoming edge)
    assert prune(named(graph, "pos_embed->a1.1.k", "a1.1->logits")) == named(
        graph, "pos_embed->a1.1.k", "a1.1->logits"
    )


def test_area_is_the_trapezoid_rule_on_a_linear_axis():
    assert area([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(0.25 + 0.5)
    assert area(MIB_FRACTIONS, [1.0] * 10) == pytest.approx(0.999)
    with pytest.raises(ValueError, match="3 fractions but 2 values"):
        area([0, 0.5, 1], [0, 1])


def oracle(graph, good=PLANTED_EDGES, bad=()):
    """Scores with the planted edges at -1 (corrupting them lowers the metric), ``bad`` at +2, others 0."""
    scores = torch.zeros(len(graph.edges))
    names = [e.name for e in graph.edges]
    for n in good:
        scores[names.index(n)] = -1.0
    for n in bad:
        scores[names.index(n)] = 2.0
    return EdgeScores(graph.edges, scores, {}, method="oracle")


def test_top_edges_counts_and_rankings(graph):
    scores = oracle(graph, bad=NOISE_EDGES)
    n = len(graph.edges)
    # 0.1 * 42 = 4.2 -> 4 edges; signed: the planted edges (importance 1) before the noise ones (-2)
    assert len(top_edges(scores, 0.1, ranking="signed", pruned=False)) == int(0.1 * n)
    signed = top_edges(scores, 5 / n, ranking="signed")
    assert signed == named(graph, *PLANTED_EDGES)
    absolute = top_edges(scores, 2 / n, ranking="absolute")  # |2| first: the noise path
    assert absolute == named(graph, *NOISE_EDGES)
    with pytest.raises(ValueError, match="fraction of the edges"):
        top_edges(scores, 1.5)
    with pytest.raises(ValueError, match="unknown ranking"):
        top_edges(scores, 0.5, ranking="sideways")  # type: ignore[arg-type]


def test_curves_of_the_planted_circuit_are_ideal_from_its_size_on(model, graph):
    task = planted_task()
    engine = EdgeEngine(model, task.tokens)
    n = len(graph.edges)
    planted = len(PLANTED_EDGES) / n
    fractions = (1 / n, 3 / n, planted, 0.2, 0.5, 1.0)
    for scores in (oracle(graph), eap_ig(model, task, engine=engine)):
        result = circuit_metrics(model, task, scores, fractions=fractions, engine=engine)
        for curve in result.curves.values():
            f = dict(zip(curve.fractions, curve.faithfulness, strict=True))
            torch.testing.assert_close(f[planted], 1.0, atol=0.01, rtol=0)
            assert f[1 / n] < 0.5  # one edge of the copy path does nothing alone
            # each point is the circuit's ordinary faithfulness
            keep = top_edges(scores, 3 / n, ranking=curve.ranking)
            torch.testing.assert_close(f[3 / n], faithfulness(engine, task, keep).fraction, atol=1e-6, rtol=0)
        ideal = area(fractions[2:], [1.0] * 4)
        # CMD of the planted part of the axis is ~0; CPR misses only the region below the planted size
        tail = result.curves["absolute"]
        torch.testing.assert_close(
            area(tail.fractions[2:], [abs(1 - f) for f in tail.faithfulness[2:]]), 0.0, atol=0.01, rtol=0
        )
        torch.testing.assert_close(
            result.cpr,
            ideal + area(fractions[:3], result.curves["signed"].faithfulness[:3]),
            atol=1e-3,
            rtol=0,
        )
        assert result.cmd < area(fractions[:3], [1.0] * 3) + 0.01


def test_a_reversed_ranking_is_measurably_worse(model, graph):
    task = planted_task()
    engine = EdgeEngine(model, task.tokens)
    good = oracle(graph)
    bad = EdgeScores(graph.edges, -good.scores, {}, method="reversed")  # the planted edges look harmful
    g = circuit_metrics(model, task, good, engine=engine)
    b = circuit_metrics(model, task, bad, engine=engine)
    assert g.cpr > b.cpr + 0.3
    # ranked by |score| both orders are the same circuits: CMD does not see the sign
    torch.testing.assert_close(g.cmd, b.cmd, atol=1e-9, rtol=0)
    assert g.curves["signed"].faithfulness[-1] == pytest.approx(1.0, abs=1e-5)  # all edges: the full model


def test_mask_like_scores_rank_by_importance(model, graph):
    probs = torch.full((len(graph.edges),), 0.1)
    names = [e.name for e in graph.edges]
    for n in PLANTED_EDGES:
        probs[names.index(n)] = 0.9
    masks = EdgeScores(graph.edges, probs, {}, method="mask", sign=ScoreSign.IMPORTANCE)
    assert top_edges(masks, 5 / len(names), ranking="signed") == named(graph, *PLANTED_EDGES)


def test_save_load_and_plot(model, graph, tmp_path):
    task = planted_task(40)
    result = circuit_metrics(model, task, oracle(graph), fractions=(0.1, 0.5, 1.0))
    path = result.save(tmp_path / "run")
    doc = read_json(path, Kind.CIRCUIT_METRICS)
    assert doc["kind"] == "circuit_metrics" and doc["cpr"] == pytest.approx(result.cpr)
    assert json.loads(path.read_text())["curves"]["signed"]["edges"] == list(result.curves["signed"].edges)
    again = CircuitMetrics.load(tmp_path / "run")
    assert again == result
    assert "plotly.min.js" in (tmp_path / "run" / "metrics.html").read_text()
    fig = result.plot()
    assert [t.name for t in fig.data] == ["signed ranking", "absolute ranking"]
    assert "CPR" in repr(result) and "<table>" in result._repr_html_()


def test_bad_arguments(model, graph):
    task = planted_task(20)
    scores = oracle(graph)
    with pytest.raises(ValueError, match="ascending"):
        circuit_metrics(model, task, scores, fractions=(0.5, 0.1))
    with pytest.raises(ValueError, match="rankings"):
        circuit_metrics(model, task, scores, rankings=("upside-down",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="another graph"):
        circuit_metrics(model, task, EdgeScores(tuple(reversed(scores.edges)), scores.scores, {}))


def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "circuits.md").read_text()
    section = text.split("## EAP-IG and MIB's faithfulness metrics", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/circuits.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("eap 3/5") and lines[1].startswith("eap-ig 5/5")
    assert CircuitMetrics.load(tmp_path / "metrics_demo").method == "eap-ig"
