"""``interplab graph build`` and ``interplab graph intervene`` end to end on a saved model and CLT."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from interplab import runs
from interplab.cli.main import app
from interplab.graphs import AttributionGraph
from interplab.sae.clt import save_clt
from tests.graphs.planted import BOS, A, B, C, D, exact_transcoder, planted_model


def _saved(tmp_path):
    model = planted_model()
    model.save(tmp_path / "model")
    save_clt(exact_transcoder(model), tmp_path / "clt")
    return tmp_path / "model", tmp_path / "clt"


def test_build_then_intervene(tmp_path):
    model, clt = _saved(tmp_path)
    out = tmp_path / "graphs" / "planted"
    tokens = ",".join(str(t) for t in [BOS, A, D, C])
    args = [
        "graph",
        "build",
        "--model",
        model,
        "--clt",
        clt,
        "--tokens",
        tokens,
        "--targets",
        f"{B},",
        "--out",
        out,
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "pruned to" in result.output and "serve --runs" in result.output
    assert str(out.absolute().parent) in result.output.replace("\n", "")
    assert runs.detect(out) is runs.Kind.ATTRIBUTION_GRAPH
    graph = AttributionGraph.load(out)
    assert [t.token for t in graph.targets] == [B]
    doc = json.loads((out / runs.GRAPH_JSON).read_text())
    assert {n["node_id"] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"} == {
        "0_0_1",
        "1_0_3",
    }
    assert doc["interplab"]["clt"] == str(clt.absolute())

    res = tmp_path / "iv.json"
    args = [
        "graph",
        "intervene",
        "--model",
        model,
        "--clt",
        clt,
        "--graph",
        out,
        "--set",
        "0:1:0*1.5",
        "--out",
        res,
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    saved = json.loads(res.read_text())
    torch.testing.assert_close(
        torch.tensor(saved["actual"]), torch.tensor(saved["predicted"]), atol=1e-5, rtol=1e-5
    )


def test_bad_input_is_one_line(tmp_path):
    model, clt = _saved(tmp_path)
    out = tmp_path / "g"
    base = ["graph", "build", "--model", str(model), "--clt", str(clt), "--out", str(out)]
    r = CliRunner().invoke(app, [*base, "--tokens", "0,1,2", "--targets", "6,"])
    assert r.exit_code == 2 and "not in the vocabulary" in r.output
    r = CliRunner().invoke(app, [*base, "--tokens", "0,1,2", "--targets", "x"])
    assert r.exit_code == 2 and "--targets 'x'" in r.output
    r = CliRunner().invoke(app, [*base])
    assert r.exit_code == 2 and "--prompt TEXT or as --tokens" in r.output
    r = CliRunner().invoke(
        app,
        ["graph", "build", "--model", str(model), "--clt", str(model), "--out", str(out), "--tokens", "0,1"],
    )
    assert r.exit_code == 2 and "expected a CLT folder" in r.output


def test_feature_db_is_a_path_or_a_url(tmp_path, monkeypatch):
    """``--feature-db`` links a file by its absolute path and a database URL as given, its password left out
    (the link is written into the run folder)."""
    model, clt = _saved(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative path is the current folder's
    tokens = ",".join(str(t) for t in [BOS, A, D, C])
    given = {
        "features.db": str((tmp_path / "features.db").absolute()),
        "postgresql://me:secret@db.lab:5432/features": "postgresql://me:***@db.lab:5432/features",
        f"sqlite:///{tmp_path}/f.db": f"sqlite:///{tmp_path}/f.db",
    }
    for i, (db, recorded) in enumerate(given.items()):
        out = tmp_path / f"g{i}"
        args = ["graph", "build", "--model", model, "--clt", clt, "--tokens", tokens, "--out", out]
        result = CliRunner().invoke(app, [str(a) for a in [*args, "--feature-db", db]])
        assert result.exit_code == 0, result.output
        assert json.loads((out / runs.GRAPH_JSON).read_text())["interplab"]["feature_db"] == recorded
