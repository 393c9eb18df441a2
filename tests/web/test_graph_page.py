"""The attribution-graph viewer's server side: a graph run (a ``graph.json`` in circuit-tracer's / Neuronpedia's
schema) is listed and shown, its nodes and links reach the page exactly, pins and supernodes are saved back into
``qParams`` and read again, and a missing, damaged, hostile or escaping graph gives a clear page (never a 500,
never markup from the file, never a read or write outside the ``--runs`` folder).

The graphs are made by `make_graph`, which writes every field exactly as circuit-tracer 0.5's
``create_graph_files`` does (ctpeer's notes, /work/wt/research/circuit_tracer.md), plus the real 0.5 output of
ctpeer's toy run (``data/circuit_tracer_example.json``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from interplab import runs
from interplab.features.writer import FeatureWriter
from interplab.graphs.attribution import AttributionGraph, NodeKind
from interplab.runs import Kind
from interplab.web.app import create_app
from interplab.web.graph_page import MAX_NODES, feature_index, graph_view
from tests.graphs.test_store import planted_graph

EXAMPLE = Path(__file__).parent / "data" / "circuit_tracer_example.json"
HOSTILE = "</script><script>alert(1)</script><!--<img src=x onerror=alert(2)>"


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, pos: int, ftype: str, **extra: Any) -> dict[str, Any]:
    """One node with every field circuit-tracer writes, in its order."""
    node = {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": pos,
        "feature_type": ftype,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": node_id,
        "clerp": "",
        "influence": None,
        "activation": None,
    }
    node.update(extra)
    return node


def feature_node(layer: int, pos: int, feat: int, influence: float, activation: float) -> dict[str, Any]:
    return _node(
        f"{layer}_{feat}_{pos}",
        cantor(layer, feat),
        str(layer),
        pos,
        "cross layer transcoder",
        jsNodeId=f"{layer}_{feat}-0",
        influence=influence,
        activation=activation,
    )


def error_node(layer: int, pos: int, influence: float) -> dict[str, Any]:  # the upstream fix of issue #78
    return _node(
        f"{layer}_-1_{pos}", -1, str(layer), pos, "mlp reconstruction error", jsNodeId=f"{layer}_-1-{pos}",
        influence=influence,
    )  # fmt: skip


def token_node(pos: int, token_id: int, influence: float) -> dict[str, Any]:
    return _node(
        f"E_{token_id}_{pos}", pos, "E", pos, "embedding", jsNodeId=f"E_{token_id}-{pos}", influence=influence
    )


def logit_node(
    pos: int, token_id: int, token: str, n_layers: int, prob: float, target: bool
) -> dict[str, Any]:
    layer = str(n_layers + 1)
    return _node(
        f"{layer}_{token_id}_{pos}",
        token_id,
        layer,
        pos,
        "logit",
        token_prob=prob,
        is_target_logit=target,
        jsNodeId=f"L_{token_id}-{pos}",
        clerp=f'Output "{token}" (p={prob:.3f})',
    )


TOKENS = ["<bos>", "A", "B", "C", "A"]
TOKEN_IDS = [0, 3, 5, 7, 3]
FEATURES = [(0, 1, 4), (0, 3, 2), (0, 4, 2), (0, 4, 6), (1, 4, 1), (1, 4, 3), (1, 2, 5)]
"""(layer, position, feature) of the active features kept"""
ERRORS = [(0, 4), (1, 4)]
LOGITS = [(5, " B", 0.61), (7, " C", 0.2)]


def make_graph(feature_db: str | None = None, d_sae: int | None = None, **extras: Any) -> dict[str, Any]:
    """A pruned 2-layer graph of the prompt `TOKENS` in circuit-tracer's JSON: 7 features, 2 errors, 5 token
    embeddings and 2 logits; links from each embedding to the features at its position, from layer-0 features
    to layer-1 features at later or equal positions, and from layer-1 features and errors to the logits,
    with signed weights. Plus interplab's ``interplab`` extras."""
    n_layers, last = 2, len(TOKENS) - 1
    nodes = [feature_node(ly, p, f, 0.1 + 0.05 * i, 1.5 + i) for i, (ly, p, f) in enumerate(FEATURES)]
    nodes += [error_node(ly, p, 0.5) for ly, p in ERRORS]
    nodes += [token_node(p, t, 0.9) for p, t in enumerate(TOKEN_IDS)]
    nodes += [logit_node(last, t, s, n_layers, prob, k == 0) for k, (t, s, prob) in enumerate(LOGITS)]
    ids = {n["node_id"]: n for n in nodes}
    links = []
    k = 0

    def link(s: str, t: str) -> None:
        nonlocal k
        k += 1
        links.append({"source": s, "target": t, "weight": (-1) ** k * (0.25 + 0.5 * k)})

    for ly, p, f in FEATURES:
        link(f"E_{TOKEN_IDS[p]}_{p}", f"{ly}_{f}_{p}")
    for l0, p0, f0 in FEATURES:
        for l1, p1, f1 in FEATURES:
            if l0 == 0 and l1 == 1 and p0 <= p1:
                link(f"{l0}_{f0}_{p0}", f"{l1}_{f1}_{p1}")
    for src in [f"1_{f}_{p}" for ly, p, f in FEATURES if ly == 1] + [f"{ly}_-1_{p}" for ly, p in ERRORS]:
        for t, _, _ in LOGITS:
            link(src, f"3_{t}_{last}")
    assert all(e["source"] in ids and e["target"] in ids for e in links)
    return {
        "metadata": {
            "slug": "toy-induction",
            "scan": "toy-clt",
            "transcoder_list": [],
            "prompt_tokens": TOKENS,
            "prompt": "".join(TOKENS),
            "node_threshold": 0.8,
            "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
        "interplab": {"run": "runs/train", "clt": "runs/clt", "feature_db": feature_db, **extras}
        | ({"d_sae": d_sae} if d_sae is not None else {}),
    }


N_NODES = len(FEATURES) + len(ERRORS) + len(TOKENS) + len(LOGITS)
N_LINKS = len(make_graph()["links"])


def hostile_graph() -> dict[str, Any]:
    """`make_graph` with HTML and script in its prompt, tokens, a label, a node id and a supernode label."""
    hostile = make_graph()
    hostile["metadata"]["prompt"] = HOSTILE
    hostile["metadata"]["prompt_tokens"] = [HOSTILE, "\u2028", "<!--", "]]>", "&amp;"]
    hostile["nodes"][0]["clerp"] = HOSTILE
    hostile["nodes"][1]["node_id"] = '"><svg onload=alert(3)>'
    hostile["links"].append({"source": '"><svg onload=alert(3)>', "target": "1_1_4", "weight": 2.0})
    hostile["qParams"]["supernodes"] = [[HOSTILE, '"><svg onload=alert(3)>', "1_1_4"]]
    hostile["metadata"]["slug"] = HOSTILE
    return hostile


SCORES = {"replacement": 0.81, "completeness": 0.93}


def write_graph(folder: Path, doc: Any, report: bool = True) -> Path:
    """A graph run folder as `interplab graph build` writes it: graph.json (``doc``, or raw text when a str)
    and a report.json of kind attribution_graph (with ``report``; without, graph.json alone, as
    circuit-tracer's ``create_graph_files`` writes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / runs.GRAPH_JSON).write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    if report:
        runs.write_json(folder / runs.REPORT, Kind.ATTRIBUTION_GRAPH, {"scores": SCORES, "n_layers": 2})
    return folder


def embedded(html: str, element: str = "graph-data") -> dict[str, Any]:
    m = re.search(rf'<script type="application/json" id="{element}">(.*?)</script>', html, re.S)
    assert m, f"no {element} in the page"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def graph_runs(tmp_path_factory, web_setup):
    root = tmp_path_factory.mktemp("graphweb") / "runs"
    db = web_setup["db"]
    write_graph(root / "induction", make_graph(feature_db=str(db)))
    write_graph(root / "example", EXAMPLE.read_text(), report=False)
    planted_graph().save(root / "planted")
    write_graph(root / "damaged", '{"nodes": [1, 2')
    write_graph(root / "not-a-graph", json.dumps([1, 2, 3]))
    write_graph(root / "hostile", hostile_graph())
    odd = make_graph()  # missing fields, wrong types, huge and non-finite numbers
    odd["nodes"] += [
        {"node_id": "no-position", "layer": "0", "feature_type": "cross layer transcoder"},
        {"feature_type": "cross layer transcoder", "layer": "0", "ctx_idx": 1},  # no id
        {"node_id": "huge-pos", "layer": "0", "ctx_idx": 10**30, "feature_type": "cross layer transcoder"},
        {"node_id": "huge-layer", "layer": str(10**18), "ctx_idx": 1, "feature_type": "x"},
        {
            "node_id": "0_4_1",
            "layer": "0",
            "ctx_idx": 1,
            "feature_type": "cross layer transcoder",
        },  # repeated
        "a string",
        {
            "node_id": "big-act",
            "layer": "1",
            "ctx_idx": 2,
            "feature_type": "cross layer transcoder",
            "activation": 10**400,
            "influence": 1e308,
            "feature": 10**400,
        },  # fmt: skip
    ]
    odd["links"] += [
        {"source": "0_4_1", "target": "1_1_4", "weight": float("inf")},
        {"source": "0_4_1", "target": "nowhere", "weight": 1.0},
        {"source": "0_4_1", "target": "1_1_4"},
        {"source": "0_4_1", "target": "1_1_4", "weight": "1.0"},
        [1, 2],
        {"source": "0_4_1", "target": "1_1_4", "weight": 1e300},
    ]
    odd["metadata"]["prompt_tokens"] = "not a list"
    odd["qParams"] = {
        "pinnedIds": ["1_1_4", "nowhere", 7],
        "supernodes": [["ok", "1_1_4", "nowhere"], [3], "x"],
    }
    write_graph(root / "odd", json.dumps(odd).replace("Infinity", "1e999"))
    train = root / "train-with-graphs"  # a training run holding graphs across checkpoints
    train.mkdir()
    (train / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    for step in (100, 200):
        write_graph(train / "graphs" / f"step_{step:06d}", make_graph())
    outside = tmp_path_factory.mktemp("outside")
    write_graph(outside / "secret", make_graph())
    (train / "graphs" / "elsewhere").symlink_to(outside / "secret")  # a graph folder that leads outside
    runs.write_json(root / "json-dir" / runs.REPORT, Kind.ATTRIBUTION_GRAPH, {"scores": SCORES})
    (root / "json-dir" / runs.GRAPH_JSON).mkdir()  # graph.json that is a folder
    (root / "escape").mkdir()
    (root / "escape" / "graph.json").symlink_to(outside / "secret" / "graph.json")
    runs.write_json(root / "escape" / runs.REPORT, Kind.ATTRIBUTION_GRAPH, {"scores": SCORES})
    runs.write_json(root / "no-json" / runs.REPORT, Kind.ATTRIBUTION_GRAPH, {"scores": SCORES})
    runs.write_json(
        train / "graphs" / "step_000300" / runs.REPORT, Kind.ATTRIBUTION_GRAPH, {"scores": SCORES}
    )
    return {"root": root, "outside": outside, "db": db}


@pytest.fixture(scope="module")
def client(graph_runs):
    return TestClient(create_app([graph_runs["db"]], runs=[graph_runs["root"]]), base_url="http://127.0.0.1")


def run_index(client: TestClient, name: str) -> int:
    html = client.get("/").text
    m = re.search(rf'<a class="run-link" href="/run/(\d+)">(?:runs/)?{re.escape(name)}</a>', html)
    assert m, f"{name} is not listed"
    return int(m.group(1))


def graph_of(client: TestClient, name: str) -> dict[str, Any]:
    r = client.get(f"/run/{run_index(client, name)}")
    assert r.status_code == 200
    return embedded(r.text)["graph"]


def test_graph_runs_are_listed_with_what_they_hold(client):
    html = client.get("/").text
    for name in ("induction", "example", "damaged", "hostile", "odd", "train-with-graphs"):
        assert f">runs/{name}<" in html
    row = html.split(">runs/train-with-graphs<")[1].split("</tr>")[0]
    assert "3 attribution graphs" in row


def test_the_page_gets_every_node_and_link_exactly(client):
    g = graph_of(client, "induction")
    doc = make_graph()
    assert g["error"] is None
    assert len(g["nodes"]) == N_NODES and len(g["links"]) == N_LINKS
    assert g["tokens"] == TOKENS
    by_id = {n["id"]: n for n in g["nodes"]}
    for raw in doc["nodes"]:
        n = by_id[raw["node_id"]]
        assert n["position"] == raw["ctx_idx"]
        assert n["activation"] == raw["activation"] and n["influence"] == raw["influence"]
    assert [n["kind"] for n in g["nodes"]] == ["feature"] * 7 + ["error"] * 2 + ["embedding"] * 5 + [
        "logit"
    ] * 2
    assert [(n["layer"], n["position"], n["feature"]) for n in g["nodes"][:7]] == FEATURES
    assert [(n["layer"], n["position"]) for n in g["nodes"][7:9]] == ERRORS
    logit = by_id["3_5_4"]
    assert logit["target"] is True and logit["probability"] == 0.61 and logit["token_id"] == 5
    assert logit["label"] == 'Output " B" (p=0.610)'
    want = {(e["source"], e["target"]): e["weight"] for e in doc["links"]}
    assert {(e["source"], e["target"]): e["weight"] for e in g["links"]} == want
    assert g["left_out"] == {"nodes": 0, "links": 0, "nodes_over_limit": 0, "links_over_limit": 0}
    assert g["info"]["replacement score"] == 0.81 and g["info"]["completeness score"] == 0.93


def test_a_graph_interplab_built_opens_exactly(client, graph_runs):
    """`interplab.graphs`' own run folder (the planted model's graph, `AttributionGraph.save`): every node
    and link of its graph.json reaches the page, each feature with its layer, position and latent."""
    folder = graph_runs["root"] / "planted"
    doc = json.loads((folder / runs.GRAPH_JSON).read_text())
    g = graph_of(client, "planted")
    assert g["error"] is None and g["left_out"]["nodes"] == g["left_out"]["links"] == 0
    assert [n["id"] for n in g["nodes"]] == [n["node_id"] for n in doc["nodes"]]
    assert g["links"] == [
        {"source": e["source"], "target": e["target"], "weight": e["weight"]} for e in doc["links"]
    ]
    graph = AttributionGraph.load(folder)
    features = {nd.node_id(graph.n_layers): nd for nd in graph.nodes if nd.kind is NodeKind.FEATURE}
    shown = [n for n in g["nodes"] if n["kind"] == "feature"]
    assert shown
    for n in shown:
        nd = features[n["id"]]
        assert (n["layer"], n["position"], n["feature"], n["activation"]) == (
            nd.layer,
            nd.position,
            nd.feature,
            nd.value,
        )
    report = runs.GraphRun.open(folder).report
    assert g["info"]["replacement score"] == report["scores"]["replacement"]


def test_circuit_tracers_own_output_opens(client):
    """ctpeer's real circuit-tracer 0.5 graph: its error ids are ``0_{layer}_{pos}`` (feature -1), its
    feature ``feature`` is the Cantor pairing of (layer, feature)."""
    g = graph_of(client, "example")
    doc = json.loads(EXAMPLE.read_text())
    assert len(g["nodes"]) == len(doc["nodes"]) == 12
    assert len(g["links"]) == len(doc["links"]) == 28
    assert g["tokens"] == doc["metadata"]["prompt_tokens"]
    kinds = {n["id"]: n["kind"] for n in g["nodes"]}
    assert kinds["0_0_4"] == kinds["0_1_4"] == "error"
    assert kinds["3_0_4"] == "logit" and kinds["E_3_1"] == "embedding"
    feats = {n["id"]: (n["layer"], n["feature"]) for n in g["nodes"] if n["kind"] == "feature"}
    assert feats == {"0_2_3": (0, 2), "0_5_4": (0, 5)}
    layers = {n["id"]: n["layer"] for n in g["nodes"]}
    assert layers["0_1_4"] == 1  # the error of layer 1, whatever its id says


@pytest.mark.parametrize(
    "node_id, layer, pos, feature, want",
    [
        ("3_17_2", 3, 2, cantor(3, 17), 17),  # the id
        ("x", 3, 2, cantor(3, 17), 17),  # the pairing
        ("x", 0, 2, cantor(0, 9), 9),
        ("x", 2, 2, 12345678, 12345678),  # neither: taken as is
        ("4_17_2", 3, 2, cantor(3, 17), 17),  # an id of another layer is not read
        ("x", 1, 0, "nope", None),
    ],
)
def test_feature_index(node_id, layer, pos, feature, want):
    assert feature_index(node_id, layer, pos, feature) == want


def test_feature_nodes_link_to_a_served_database(client, graph_runs, tmp_path):
    g = graph_of(client, "induction")
    assert g["feature_db"]["name"] == "tiny"
    f = next(n for n in g["nodes"] if n["id"] == "1_3_4")
    assert f["page"] == {"db": "tiny", "path": str(graph_runs["db"]), "index": 3}
    # one database of all layers' latents: layer * d_sae + feature
    write_graph(tmp_path / "runs" / "flat", make_graph(feature_db=str(graph_runs["db"]), d_sae=8))
    write_graph(tmp_path / "runs" / "unserved", make_graph(feature_db="../missing.db"))
    per_layer = make_graph(feature_dbs={"0": str(graph_runs["db"]), "1": "nowhere.db"})
    write_graph(tmp_path / "runs" / "per-layer", per_layer)
    served = {graph_runs["db"].resolve(): "tiny"}
    flat = graph_view((tmp_path / "runs" / "flat").resolve(), (tmp_path / "runs").resolve(), served)
    pages = {n["id"]: n["page"] for n in flat["nodes"] if n["kind"] == "feature"}
    assert pages["1_3_4"]["index"] == 8 + 3 and pages["0_6_4"]["index"] == 6
    unserved = graph_view((tmp_path / "runs" / "unserved").resolve(), (tmp_path / "runs").resolve(), served)
    assert unserved["feature_db"]["name"] is None and unserved["nodes"][0]["page"]["db"] is None
    pl = graph_view((tmp_path / "runs" / "per-layer").resolve(), (tmp_path / "runs").resolve(), served)
    pages = {n["id"]: n["page"] for n in pl["nodes"] if n["kind"] == "feature"}
    assert pages["0_4_1"] == {"db": "tiny", "path": str(graph_runs["db"]), "index": 4}
    assert pages["1_3_4"]["db"] is None
    bare = graph_of(client, "example")
    assert all(n.get("page") is None for n in bare["nodes"])
    assert "no feature database is linked" in client.get(f"/run/{run_index(client, 'example')}").text


def test_saved_pins_and_supernodes_round_trip(client, graph_runs):
    i = run_index(client, "induction")
    path = graph_runs["root"] / "induction" / "graph.json"
    before = json.loads(path.read_text())
    body = {
        "pinnedIds": ["0_4_1", "1_3_4", "1_1_4", "3_5_4"],
        "supernodes": [["  say B  ", "1_3_4", "1_1_4"], ["A token", "0_4_1"]],
    }
    r = client.post(f"/api/run/{i}/graph", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "pinnedIds": body["pinnedIds"],
        "supernodes": [["say B", "1_3_4", "1_1_4"], ["A token", "0_4_1"]],
    }
    after = json.loads(path.read_text())
    assert after["qParams"] == {**before["qParams"], **r.json()}  # linkType, clickedId ... kept
    assert {k: v for k, v in after.items() if k != "qParams"} == {
        k: v for k, v in before.items() if k != "qParams"
    }
    g = graph_of(client, "induction")
    assert g["pinned"] == body["pinnedIds"]
    assert g["supernodes"] == [
        {"label": "say B", "members": ["1_3_4", "1_1_4"]},
        {"label": "A token", "members": ["0_4_1"]},
    ]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".graph.json")]  # no temp file left
    r = client.post(f"/api/run/{i}/graph", json={"pinnedIds": [], "supernodes": []})
    assert r.status_code == 200 and json.loads(path.read_text())["qParams"]["supernodes"] == []


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"pinnedIds": ["nowhere"]}, 422, "'nowhere' is not a node"),
        ({"supernodes": [["  ", "1_3_4"]]}, 422, "label"),
        ({"supernodes": [["x" * 201, "1_3_4"]]}, 422, "supernodes"),
        ({"supernodes": [["lonely"]]}, 422, "no members"),
        ({"supernodes": [["a", "1_3_4"], ["b", "1_3_4"]]}, 422, "two supernodes"),
        ({"supernodes": [["a", "nowhere"]]}, 422, "not a node"),
        ({"pinnedIds": "1_3_4"}, 422, "pinnedIds"),
        ({"pinnedIds": ["x" * 201]}, 422, "pinnedIds"),
        ({"at": "../example", "pinnedIds": []}, 404, "no attribution graph"),
        ({"at": "/etc", "pinnedIds": []}, 404, "no attribution graph"),
    ],
)
def test_bad_saves_are_refused_and_change_nothing(client, graph_runs, body, status, says):
    path = graph_runs["root"] / "induction" / "graph.json"
    before = path.read_bytes()
    r = client.post(f"/api/run/{run_index(client, 'induction')}/graph", json=body)
    assert r.status_code == status and says in r.json()["error"]
    assert path.read_bytes() == before


def test_saves_from_another_origin_or_read_only_are_refused(client, graph_runs):
    path = graph_runs["root"] / "induction" / "graph.json"
    before = path.read_bytes()
    i = run_index(client, "induction")
    body = {"pinnedIds": ["1_3_4"]}
    r = client.post(f"/api/run/{i}/graph", json=body, headers={"Origin": "http://evil.test"})
    assert r.status_code == 403
    r = client.post(f"/api/run/{i}/graph", json=body, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    ro = TestClient(create_app(runs=[graph_runs["root"]], read_only=True), base_url="http://127.0.0.1")
    r = ro.post(f"/api/run/{run_index(ro, 'induction')}/graph", json=body)
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert path.read_bytes() == before


def test_an_unwritable_graph_says_so(client, graph_runs):
    if os.geteuid() == 0:
        pytest.skip("root writes any file")
    folder = graph_runs["root"] / "example"
    folder.chmod(0o555)
    try:
        r = client.post(f"/api/run/{run_index(client, 'example')}/graph", json={"pinnedIds": []})
    finally:
        folder.chmod(0o755)
    assert r.status_code == 403 and "cannot be written" in r.json()["error"]


def test_a_graph_outside_the_runs_folder_is_neither_read_nor_written(client, graph_runs):
    secret = graph_runs["outside"] / "secret" / "graph.json"
    before = secret.read_bytes()
    i = run_index(client, "escape")
    r = client.get(f"/run/{i}")
    assert r.status_code == 200
    assert "1_3_4" not in r.text  # none of the outside graph reaches the page
    r = client.post(f"/api/run/{i}/graph", json={"pinnedIds": ["1_3_4"]})
    assert r.status_code == 404
    assert secret.read_bytes() == before
    k = run_index(client, "train-with-graphs")  # a sub-folder that is a link to a graph outside
    assert client.get(f"/run/{k}/graph", params={"at": "graphs/elsewhere"}).status_code == 404
    r = client.post(f"/api/run/{k}/graph", json={"at": "graphs/elsewhere", "pinnedIds": ["1_3_4"]})
    assert r.status_code == 404 and secret.read_bytes() == before
    assert "elsewhere" not in client.get(f"/run/{k}").text
    j = run_index(client, "induction")
    for at in ("..", "../escape", "../../outside", str(graph_runs["outside"] / "secret"), "a\x00b"):
        r = client.get(f"/run/{j}/graph", params={"at": at})
        assert r.status_code == 404, at


@pytest.mark.parametrize(
    "name, says",
    [
        ("damaged", "graph.json is not JSON"),
        ("not-a-graph", "not an attribution graph"),
        ("no-json", "no graph.json here"),
        ("escape", "no graph.json here"),
        ("json-dir", "no graph.json here"),
    ],
)
def test_a_missing_or_damaged_graph_gives_a_clear_page(client, name, says):
    r = client.get(f"/run/{run_index(client, name)}")
    assert r.status_code == 200
    m = re.search(r'<p class="graph-error" id="graph-error">(.*?)</p>', r.text, re.S)
    assert m and says in m.group(1)
    assert embedded(r.text)["graph"]["nodes"] == []


def test_malformed_nodes_and_links_are_left_out_and_counted(client):
    g = graph_of(client, "odd")
    ids = {n["id"] for n in g["nodes"]}
    assert len(g["nodes"]) == N_NODES + 1 and "big-act" in ids  # kept, its numbers dropped
    big = next(n for n in g["nodes"] if n["id"] == "big-act")
    assert big["activation"] is None and big["influence"] == 1e308 and big["feature"] is None
    assert g["left_out"]["nodes"] == 6
    assert len(g["links"]) == N_LINKS + 1 and g["left_out"]["links"] == 5
    assert g["tokens"] == []
    assert g["pinned"] == ["1_1_4"] and g["supernodes"] == [{"label": "ok", "members": ["1_1_4"]}]
    page = client.get(f"/run/{run_index(client, 'odd')}").text
    assert "6 malformed or repeated nodes" in page and "5 malformed links" in page


def test_hostile_strings_are_text_never_markup(client):
    r = client.get(f"/run/{run_index(client, 'hostile')}")
    assert r.status_code == 200
    html = r.text
    assert "<script>alert(1)" not in html and "<img src=x" not in html and "<svg onload" not in html
    assert html.count("</script>") == html.count("<script")  # no string closed a script element
    g = embedded(html)["graph"]
    assert g["prompt"] == HOSTILE and g["tokens"][0] == HOSTILE and g["tokens"][1] == "\u2028"
    assert g["nodes"][0]["label"] == HOSTILE
    assert g["supernodes"] == [{"label": HOSTILE, "members": ['"><svg onload=alert(3)>', "1_1_4"]}]
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in html  # the prompt in the heading, escaped


def test_graphs_inside_a_run_have_their_own_page(client):
    i = run_index(client, "train-with-graphs")
    html = client.get(f"/run/{i}").text
    links = re.findall(r'<a class="graph-link" href="([^"]+)">', html)
    assert links == [f"/run/{i}/graph?at=graphs/step_{s:06d}" for s in (100, 200, 300)]
    assert 'id="training"' in html and 'id="graph"' not in html
    r = client.get(links[1])
    assert r.status_code == 200
    data = embedded(r.text)
    assert data["at"] == "graphs/step_000200" and len(data["graph"]["nodes"]) == N_NODES
    r = client.post(f"/api/run/{i}/graph", json={"at": "graphs/step_000200", "pinnedIds": ["1_3_4"]})
    assert r.status_code == 200
    assert embedded(client.get(links[1]).text)["graph"]["pinned"] == ["1_3_4"]
    assert embedded(client.get(links[0]).text)["graph"]["pinned"] == []
    r = client.get(links[2])  # a graph run whose graph.json is missing: said so on its page
    assert r.status_code == 200 and "no graph.json here" in r.text
    r = client.post(f"/api/run/{i}/graph", json={"at": "graphs/step_000300", "pinnedIds": []})
    assert r.status_code == 404 and "no graph.json" in r.json()["error"]
    r = client.get(f"/run/{i}/graph", params={"at": "graphs/step_000400"})
    assert r.status_code == 404 and "no attribution graph" in r.text
    assert client.get(f"/run/{i}/graph").status_code == 404  # the run itself holds none
    assert client.head(links[0]).status_code == 200


def test_a_graph_over_the_node_limit_keeps_the_most_influential(tmp_path):
    doc = make_graph()
    doc["nodes"] += [feature_node(0, 2, 100 + k, 0.99, 1.0) for k in range(MAX_NODES)]
    write_graph(tmp_path / "big", doc)
    g = graph_view((tmp_path / "big").resolve(), tmp_path.resolve())
    assert len(g["nodes"]) == MAX_NODES and g["left_out"]["nodes_over_limit"] == N_NODES
    kept = {n["id"] for n in g["nodes"]}
    assert {
        n["node_id"] for n in make_graph()["nodes"]
    } <= kept  # lower cumulative influence = more important


def test_a_graph_folder_served_as_the_runs_folder_itself(tmp_path):
    """``interplab serve --runs runs/g1``: the graph is the root; it is listed, shown and saved."""
    folder = write_graph(tmp_path / "g1", make_graph())
    client = TestClient(create_app(runs=[folder]), base_url="http://127.0.0.1")
    i = run_index(client, "g1")
    assert len(graph_of(client, "g1")["nodes"]) == N_NODES
    r = client.post(f"/api/run/{i}/graph", json={"pinnedIds": ["1_3_4"], "supernodes": [["x", "1_3_4"]]})
    assert r.status_code == 200
    assert json.loads((folder / runs.GRAPH_JSON).read_text())["qParams"]["supernodes"] == [["x", "1_3_4"]]


def test_feature_nodes_take_their_databases_explanations(tmp_path, web_setup):
    """A feature without a label shows its explanation in the linked database (a label with script in it:
    it stays text)."""
    db = tmp_path / "labelled.db"
    src, dst = sqlite3.connect(web_setup["db"]), sqlite3.connect(db)
    src.backup(dst)  # a copy of its own: other tests label the shared databases
    src.close()
    dst.close()
    with contextlib.closing(FeatureWriter(db)) as store:
        store.set_label(3, "<!--<script>alert(1)</script> & </script>")
    write_graph(tmp_path / "runs" / "g", make_graph(feature_db=str(db)))
    client = TestClient(create_app([db], runs=[tmp_path / "runs"]), base_url="http://127.0.0.1")
    r = client.get(f"/run/{run_index(client, 'g')}")
    labels = {n["id"]: n["label"] for n in embedded(r.text)["graph"]["nodes"]}
    assert labels["1_3_4"] == "<!--<script>alert(1)</script> & </script>"  # layer 1, feature 3
    assert labels["0_2_3"] == labels["0_4_1"] == ""  # features 2 and 4 have none
    assert "<script>alert(1)" not in r.text


def test_feature_nodes_link_to_a_database_served_by_url(graph_runs, tmp_path):
    """A graph that links its database by URL finds it served by the same URL (with or without its
    password), and a ``sqlite:///FILE`` URL is the same database as FILE."""
    db = graph_runs["db"]
    pg = "postgresql://me:secret@db.lab/features"
    cases = [  # (link written in the graph, served database -> name)
        (pg, {"postgresql://me:***@db.lab/features": "pg"}, "pg"),
        (f"sqlite:///{db}", {db.resolve(): "tiny"}, "tiny"),
        (pg.replace("db.lab", "other.lab"), {"postgresql://me:***@db.lab/features": "pg"}, None),
    ]
    for i, (link, served, name) in enumerate(cases):
        write_graph(tmp_path / "runs" / f"g{i}", make_graph(feature_db=link))
        view = graph_view((tmp_path / "runs" / f"g{i}").resolve(), (tmp_path / "runs").resolve(), served)
        assert view["feature_db"]["name"] == name
        assert "secret" not in json.dumps(view)
        pages = [n["page"] for n in view["nodes"] if n["kind"] == "feature"]
        assert pages and all(p["db"] == name for p in pages)


def test_a_database_served_by_url_is_linked_from_its_graphs(tmp_path, graph_runs, feature_db):
    """On SQLite (a ``sqlite:///`` URL) and PostgreSQL: `interplab serve --db URL` links a graph's feature
    nodes that name the database by that URL to its pages."""
    from interplab.features.writer import copy_database

    target = feature_db("tiny.db")
    url = f"sqlite:///{target}" if isinstance(target, Path) else target
    copy_database(graph_runs["db"], url)
    write_graph(tmp_path / "runs" / "g", make_graph(feature_db=url))
    client = TestClient(create_app([url], runs=[tmp_path / "runs"]), base_url="http://127.0.0.1")
    g = graph_of(client, "g")
    assert g["feature_db"]["name"] is not None
    f = next(n for n in g["nodes"] if n["id"] == "1_3_4")
    assert f["page"]["db"] == g["feature_db"]["name"] and f["page"]["index"] == 3
    assert client.get(f"/db/{f['page']['db']}/feature/3").status_code == 200
