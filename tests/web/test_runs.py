"""Run folders on the web app: containment under --runs (symlinks), malformed reports shown as missing
(never a 500), the home page listing runs (not checkpoints) with formatted numbers."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
from fastapi.testclient import TestClient

from interplab.web.views import format_number
from tests.web.conftest import write_training_run


def client_for(runs) -> TestClient:
    from interplab.web.app import create_app

    return TestClient(create_app([], runs=runs), base_url="http://127.0.0.1")


def test_symlinks_out_of_runs_are_not_followed(tmp_path):
    outside = tmp_path / "private"
    (outside / "secret-run").mkdir(parents=True)
    (outside / "secret-run" / "report.json").write_text(json.dumps({"secret_value": 123456789}))
    (outside / "secret-run" / "log.jsonl").write_text(json.dumps({"step": 1, "secret_curve": 5}) + "\n")
    (outside / "attr").mkdir()
    (outside / "attr" / "report.json").write_text(json.dumps({"target": "SECRET-TARGET", "top": []}))
    runs = tmp_path / "runs"
    run = runs / "mine"
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    os.symlink(outside / "secret-run" / "report.json", run / "report.json")  # a file out of --runs
    (run / "attribution").mkdir()
    os.symlink(outside / "attr", run / "attribution" / "x")  # a folder out of --runs
    os.symlink(outside / "secret-run", runs / "linked")  # a run out of --runs
    os.symlink(runs, run / "loop")  # a loop back up is inside, and visited once
    os.symlink(tmp_path / "nowhere", runs / "dangling")
    inside = runs / "alias"
    os.symlink(run, inside)  # a link that stays inside is fine (the same run, listed once)
    c = client_for([runs])
    home = c.get("/").text
    assert "mine" in home and "linked" not in home and "123,456,789" not in home
    assert home.count('class="run-link"') == 1
    page = c.get("/run/0").text
    assert "secret" not in page.lower() and "123456789" not in page
    assert '"loss"' in page


ODD_REPORTS = [
    {"target": "t", "top": [{"sequence": 1, "text": "no score"}]},  # the reported 500
    {"target": "t", "top": [{"sequence": 1, "score": "high", "text": None}]},
    {"target": "t", "top": [{"score": float("nan")}, "a string row", 5, None, []]},
    {"target": "t", "top": "not a list", "window": "50..100", "enriched_tokens": ["tok", 3, None, {"x": 1}]},
    {"target": {"nested": True}, "top": [], "n_candidates": "many", "method": ["a", "b"]},
    {"target": None, "top": None},
    {"target": "t", "top": [{"sequence": {"a": 1}, "score": [1, 2], "text": {"b": 2}}], "curve": [1, "x"]},
]


@pytest.mark.parametrize("report", ODD_REPORTS)
def test_odd_attribution_reports_render(tmp_path, report):
    run = tmp_path / "runs" / "r"
    (run / "attribution" / "a").mkdir(parents=True)
    (run / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "attribution" / "a" / "report.json").write_text(json.dumps(report))
    r = client_for([tmp_path / "runs"]).get("/run/0")
    assert r.status_code == 200, r.text[-2000:]


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none", "nan"] + (
        ["list", "dict", "numlist"] if depth < 4 else []
    )
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 10**20, 3])
    if kind == "float":
        return rng.choice([0.5, -1e300, 22120.75621])
    if kind == "nan":
        return rng.choice([math.nan, math.inf, -math.inf])
    if kind == "str":
        return rng.choice(["", "x", "<!--<script>", "step"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "numlist":
        return [rng.random() for _ in range(rng.randint(0, 4))]
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [
        "step",
        "steps",
        "loss",
        "top",
        "target",
        "saes",
        "name",
        "curve",
        "summary",
        "formation_step",
        "x",
    ]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))}


@pytest.mark.parametrize("seed", range(12))
def test_random_run_files_never_break_the_run_page(tmp_path, seed):
    """Every file the run page reads, filled with random JSON (or junk): the page still renders."""
    rng = random.Random(seed)
    run = tmp_path / "runs" / "r"
    for rel in [
        "report.json",
        "config.json",
        "formation/formation.json",
        "diffs/step_000001-step_000002/diff.json",
        "attribution/a/report.json",
        "sae/eval/report.json",
        "sae/saes/s/cfg.json",
    ]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        content = json.dumps(_random_json(rng)) if rng.random() < 0.85 else rng.choice(["{", "\x00\xff", ""])
        (run / rel).write_text(content)
    (run / "sae" / "saes" / "s" / "sae_weights.safetensors").write_bytes(b"")
    lines = [json.dumps(_random_json(rng)) for _ in range(20)] + ["junk", "[1,2]", '{"step": "x"}']
    (run / "log.jsonl").write_text("\n".join(lines))
    (run / "sae" / "log.jsonl").write_text("\n".join(lines[::-1]))
    c = client_for([tmp_path / "runs"])
    assert c.get("/").status_code == 200
    r = c.get("/run/0")
    assert r.status_code == 200, r.text[-2000:]


def test_home_lists_a_run_once_with_its_parts(tmp_path, web_setup):
    write_training_run(tmp_path / "runs" / "big", web_setup["model"], n_checkpoints=43)
    c = client_for([tmp_path / "runs"])
    home = c.get("/").text
    assert home.count('class="run-link"') == 1 and "step_0" not in home
    assert "43 checkpoints" in home and "22,121" in home and "22120.75621" not in home
    assert (
        'id="models"' not in home and 'id="saes"' not in home
    )  # the run's final model and SAE are its parts
    page = c.get("/run/0").text
    assert "43 checkpoints at steps 0, 50, 100, 150, 200, 250, 300, 350, …" in page


def test_run_page_lists_its_model_diffs_beside_the_formation_report(tmp_path, web_setup):
    """A diff saved where `interplab sae diff` puts it by default (RUN/diffs/step_A-step_B) shows on the run's
    page in the formation section: the counts, whether it brackets the formation step, the latents leaning
    new (the new one first) with their contexts, and a link to the relative-norm picture that serves."""
    import torch

    from interplab import runs
    from interplab.sae.diffing import DiffResult, default_diff_folder

    run = tmp_path / "runs" / "r"
    write_training_run(run, web_setup["model"], n_checkpoints=3)
    runs.write_json(run / runs.FORMATION / runs.FORMATION_JSON, runs.Kind.FORMATION, {"formation_step": 50})
    d = DiffResult(
        torch.tensor([0.95, 0.5, 0.05, 0.8]),
        torch.tensor([0.1, 0.9, 0.2, 0.4]),
        ("new", "shared", "lost", "partial"),
        "step_000000:h",
        "step_000100:h",
        fvu=0.12,
        formation={"formation_step": 50, "brackets": True},
        examples={0: [{"context": "x = a[<b>]", "token": "<b>", "act": 2.5}]},
    )
    folder = default_diff_folder(run, 0, 100)
    assert folder == run / "diffs" / "step_000000-step_000100"
    d.save(folder)
    c = client_for([tmp_path / "runs"])
    page = c.get("/run/0").text
    section = page.split('id="diff-0"')[1].split("</div>")[0]
    assert "step_000000:h → step_000100:h" in section and "1 new, 1 lost, 1 shared, 1 partial" in section
    assert "forms at step <b>50</b>, <b>between</b> these checkpoints" in section
    rows = section.split("<tr>")[2:]
    assert [r.split("<td>")[1].split("</td>")[0] for r in rows] == ["0", "3", "1", "2"]  # leaning new first
    assert "x = a[&lt;b&gt;]" in rows[0]  # escaped
    href = section.split('class="diff-plot" href="')[1].split('"')[0]
    assert href == "/run/0/files/diffs/step_000000-step_000100/relative_norm.html"
    assert c.get(href).status_code == 200


def test_a_model_diff_served_on_its_own_is_listed_and_its_page_shows_the_diff(tmp_path, web_setup):
    """A diff written outside its run (`sae diff --out DIR`) is a run of its own kind on the home page, and its
    page shows the diff."""
    import torch

    from interplab.sae.diffing import DiffResult

    d = DiffResult(
        torch.tensor([0.95, 0.5]), torch.tensor([0.1, 0.9]), ("new", "shared"), "a:h", "b:h", fvu=0.2
    )
    d.save(tmp_path / "runs" / "mydiff")
    c = client_for([tmp_path / "runs"])
    assert 'href="/run/0">runs/mydiff</a>' in c.get("/").text
    section = c.get("/run/0").text.split('id="diff-0"')[1].split("</div>")[0]
    assert "a:h → b:h" in section and "1 new, 0 lost, 1 shared" in section


@pytest.mark.parametrize(
    "value,shown",
    [
        (22120.75621, "22,121"),
        (4.765039920806885, "4.765"),
        (0.22946913, "0.2295"),
        (4.2e-06, "4.2e-06"),
        (1500, "1,500"),
        (True, "yes"),
        (None, "\u2014"),
        (0.0, "0"),
        (-3.5, "-3.5"),
        (1e20, "1e+20"),
        (math.nan, "nan"),
        ("topk", "topk"),
    ],
)
def test_numbers_are_formatted(value, shown):
    assert format_number(value) == shown


def test_folders_are_what_the_run_contract_says(tmp_path):
    """Each folder is recognised by `interplab.runs.detect` (kind-tagged or written before kinds existed):
    analysis runs are runs, an activation cache is not listed, a .db that is not SQLite is no database."""
    from interplab import runs
    from interplab.runs import Kind
    from interplab.web.runs import contents, find_artifacts

    root = tmp_path / "runs"
    patch = root / "patch"
    runs.write_json(patch / runs.CONFIG, Kind.PATCH, {"model": "m", "target": "z"})
    runs.write_json(patch / runs.REPORT, Kind.PATCH, {"seconds": 1.5})
    (patch / "fake.db").write_text("not SQLite")
    legacy = root / "scrub"  # as interplab wrote it before every JSON carried kind and version
    (legacy / "h").mkdir(parents=True)
    (legacy / "config.json").write_text(json.dumps({"command": "scrub", "n_examples": 10}))
    (legacy / "h" / "report.json").write_text(json.dumps({"kind": "scrub", "n_examples": 10}))
    attributed = root / "trained"
    (attributed / "attribution" / "new").mkdir(parents=True)
    (attributed / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    runs.write_json(attributed / "attribution" / "new" / runs.REPORT, Kind.ATTRIBUTION, {"target": "t"})
    cache = root / "cache"
    runs.write_json(cache / runs.MANIFEST, Kind.ACTIVATION_CACHE, {"hooks": {}, "shards": []})
    (cache / "inner").mkdir()
    (cache / "inner" / "log.jsonl").write_text('{"step": 1}\n')
    found = {a.name: (a.kind, a.what) for a in find_artifacts([root])}
    assert found == {
        "runs/patch": ("run", "an activation-patching run"),
        "runs/scrub": ("run", "a causal-scrubbing run"),
        "runs/trained": ("run", ""),
    }
    resolved = root.resolve()
    assert contents(patch.resolve(), resolved)["databases"] == []
    assert contents(attributed.resolve(), resolved)["attributions"] == [
        (attributed / "attribution" / "new").resolve()
    ]


def test_run_page_shows_graphs_across_training_in_step_order(tmp_path, web_setup):
    """Graphs across checkpoints saved where `interplab graph across` puts them (RUN/graphs/NAME/) show on the
    run's page in step order with the formation scores and what changed, each linked to its graph page."""
    from interplab import runs
    from tests.graphs.test_across import _compare

    run = tmp_path / "runs" / "r"
    write_training_run(run, web_setup["model"], n_checkpoints=3)
    across, graphs = _compare()
    folder = run / runs.GRAPHS / "across"
    for step, g in zip((20, 10), graphs[::-1], strict=True):  # written out of order
        g.save(folder / runs.checkpoint_name(step))
    data = across.to_dict()
    data["graphs"] = [{**g, "folder": runs.checkpoint_name(g["step"])} for g in data["graphs"]][::-1]
    data["graphs"][0]["induction"] = 0.75
    runs.write_json(folder / runs.REPORT, runs.Kind.GRAPH_ACROSS, data)
    c = client_for([tmp_path / "runs"])
    page = c.get("/run/0").text
    section = page.split('id="across-0"')[1].split("</div>")[0]
    rows = section.split("<tr>")[2:]
    assert [r.split("<td>")[1].split("</td>")[0] for r in rows] == ["10", "20"]
    assert "<td>0.75</td>" in rows[1] and "+2 / −0" in rows[1] and "+3 / −0" in rows[1]
    href = rows[0].split('class="graph-link" href="')[1].split('"')[0]
    assert href == "/run/0/graph?at=graphs/across/step_000010"
    assert c.get(href).status_code == 200
    assert "QK score" not in section  # no QK attribution in this report
    qk = {"layer": 0, "head": 2, "query_pos": 3, "key_pos": 2, "score": 6.0, "through_previous": 6.0,
          "top": [{"query": "E_1_3", "key": "0_0@10_1", "part": 6.0, "through": 1, "label": "token 1 <x> f"}]}  # fmt: skip
    data["graphs"][0]["qk"] = qk
    runs.write_json(folder / runs.REPORT, runs.Kind.GRAPH_ACROSS, data)
    section = c.get("/run/0").text.split('id="across-0"')[1].split("</div>")[0]
    assert "QK score of L0H2, query 3 -&gt; key 2" in section
    rows = section.split("<tr>")[2:]
    assert '<td class="qk-score">6 (6)</td>' in rows[1]
    assert "token 1 &lt;x&gt; f: +6.000" in rows[1] and '<td class="qk-top"></td>' in rows[0]
