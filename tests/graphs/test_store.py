"""The graph's run folder round-trips exactly; its graph.json has circuit-tracer's schema (the fields of the
example ctpeer recorded from circuit-tracer 0.5) and reads back; the picture draws the pruned graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interplab import runs
from interplab.graphs.attribution import AttributionGraph, NodeKind, attribute
from interplab.graphs.export import cantor, from_neuronpedia_json, to_neuronpedia_json
from interplab.graphs.prune import prune_graph
from tests.graphs.helpers import random_clt, variant_model
from tests.graphs.planted import BOS, A, B, C, D, exact_transcoder, planted_model

EXAMPLE = Path("/work/wt/research/circuit_tracer_example.json")
NODE_FIELDS = [
    "node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
    "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation",
]  # fmt: skip


def planted_graph() -> AttributionGraph:
    model = planted_model()
    return attribute(model, exact_transcoder(model), torch.tensor([BOS, A, D, C]), targets=[B, C])


def test_save_load_round_trip(tmp_path):
    model = variant_model("gpt2")
    graph = attribute(
        model, random_clt(model), torch.randint(0, 23, (6,)), targets=3, meta={"clt": "somewhere"}
    )
    pruned = prune_graph(graph, 0.7, 0.9)
    folder = graph.save(tmp_path / "g", pruned)
    assert runs.detect(folder) is runs.Kind.ATTRIBUTION_GRAPH
    assert isinstance(runs.open_run(folder), runs.GraphRun)
    back = AttributionGraph.load(folder)
    torch.testing.assert_close(back.adjacency, graph.adjacency, atol=0, rtol=0)
    assert back.nodes == graph.nodes
    assert back.targets[0].label == graph.targets[0].label
    torch.testing.assert_close(back.targets[1].vector, graph.targets[1].vector, atol=0, rtol=0)
    again = AttributionGraph.load_pruned(folder)
    assert torch.equal(again.node_mask, pruned.node_mask) and torch.equal(again.edge_mask, pruned.edge_mask)
    report = runs.GraphRun.open(folder).report
    assert report["kind"] == "attribution_graph" and 0 < report["scores"]["replacement"] <= 1
    doc = json.loads((folder / runs.GRAPH_JSON).read_text())
    assert doc["interplab"]["clt"] == "somewhere"


def test_rebuild_keeps_the_viewers_pins_and_supernodes(tmp_path):
    graph = planted_graph()
    folder = graph.save(tmp_path / "g")
    doc = json.loads((folder / runs.GRAPH_JSON).read_text())
    doc["qParams"]["pinnedIds"] = ["0_0_1"]
    doc["qParams"]["supernodes"] = [["copy A", "0_0_1", "1_0_3"]]
    (folder / runs.GRAPH_JSON).write_text(json.dumps(doc))
    graph.save(folder)
    read = from_neuronpedia_json(json.loads((folder / runs.GRAPH_JSON).read_text()))
    assert read.pinned == ["0_0_1"] and read.supernodes == [("copy A", ["0_0_1", "1_0_3"])]


def test_the_json_has_circuit_tracers_schema():
    graph = planted_graph()
    doc = to_neuronpedia_json(graph, prune_graph(graph), slug="planted")
    if EXAMPLE.is_file():
        example = json.loads(EXAMPLE.read_text())
        assert list(doc["metadata"]) == list(example["metadata"])
        assert list(doc["qParams"]) == list(example["qParams"])
        assert [list(n) for n in doc["nodes"]] == [list(example["nodes"][0])] * len(doc["nodes"])
        assert list(doc["links"][0]) == list(example["links"][0])
    assert all(list(n) == NODE_FIELDS for n in doc["nodes"])
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    # the planted path and every token and logit; no error node (none has an edge)
    assert set(by_id) == {"0_0_1", "1_0_3", f"3_{B}_3", f"3_{C}_3"} | {
        f"E_{t}_{p}" for p, t in enumerate([BOS, A, D, C])
    }
    f = by_id["0_0_1"]
    assert f["feature"] == cantor(0, 0) and f["layer"] == "0" and f["jsNodeId"] == "0_0-0"
    assert f["feature_type"] == "cross layer transcoder" and f["activation"] == pytest.approx(1.0)
    assert by_id["1_0_3"]["feature"] == cantor(1, 0) == 1
    logit = by_id[f"3_{B}_3"]
    assert logit["is_target_logit"] and logit["jsNodeId"] == f"L_{B}-3" and logit["influence"] is None
    assert logit["clerp"] == f'Output "{B}" (p={graph.targets[0].weight:.3f})'
    assert not by_id[f"3_{C}_3"]["is_target_logit"]
    assert by_id[f"E_{A}_1"]["feature"] == 1 and by_id[f"E_{A}_1"]["layer"] == "E"
    links = {(r["source"], r["target"]): r["weight"] for r in doc["links"]}
    assert links[(f"E_{A}_1", "0_0_1")] == pytest.approx(1.0)
    # the last feature also lowers C's demeaned logit (its column is 0, the mean column e4 / 6)
    assert set(links) == {
        (f"E_{A}_1", "0_0_1"),
        ("0_0_1", "1_0_3"),
        ("1_0_3", f"3_{B}_3"),
        ("1_0_3", f"3_{C}_3"),
    }


def test_reader_reads_ours_and_circuit_tracers():
    graph = planted_graph()
    read = from_neuronpedia_json(to_neuronpedia_json(graph))
    feats = [n for n in read.nodes if n.kind is NodeKind.FEATURE]
    assert {(n.layer, n.position, n.feature) for n in feats} == {(0, 1, 0), (1, 3, 0)}
    assert [n.feature for n in read.nodes if n.kind is NodeKind.EMBEDDING] == [BOS, A, D, C]
    if EXAMPLE.is_file():
        ct = from_neuronpedia_json(json.loads(EXAMPLE.read_text()))
        errors = [n for n in ct.nodes if n.kind is NodeKind.ERROR]
        assert errors and all(n.feature is None and n.layer is not None for n in errors)
    with pytest.raises(ValueError, match="not a Neuronpedia graph JSON"):
        from_neuronpedia_json({"nodes": []})


def test_plot_draws_the_pruned_graph():
    graph = planted_graph()
    fig = graph.plot()
    markers = [t for t in fig.data if t.mode == "markers"]
    assert sum(len(t.x) for t in markers) == prune_graph(graph).n_nodes
    assert sum(1 for t in fig.data if t.mode == "lines") == 4
