"""`interplab features score DB` (the scorers' subcommand)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.features.planted import ORACLE, build_planted_db
from interplab.features.reader import FeatureReader

runner = CliRunner()


@pytest.fixture
def planted(tmp_path, monkeypatch):
    for var in (
        "INTERPLAB_LLM_BASE_URL",
        "INTERPLAB_LLM_MODEL",
        "INTERPLAB_LLM_LOCAL",
        "INTERPLAB_LLM_API_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    return build_planted_db(tmp_path / "planted.db")


def test_score_offline_stores_and_resumes(planted):
    res = runner.invoke(app, ["features", "score", str(planted.path), "--scorers", "baseline", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "scored 20 " in res.output
    with FeatureReader(planted.path) as r:
        oracle = next(e for e in r.explanations(0) if e["explainer"] == ORACLE)
        (s,) = r.scores(oracle["id"])
        assert (s["scorer"], s["seed"], s["backend"]) == ("baseline", 2, "none")
    again = runner.invoke(
        app, ["features", "score", str(planted.path), "--scorers", "baseline", "--seed", "2"]
    )
    assert again.exit_code == 0 and "nothing new" in again.output


def test_score_needs_a_backend_for_llm_scorers_and_names_bad_input(planted):
    res = runner.invoke(app, ["features", "score", str(planted.path), "--scorers", "detection"])
    assert res.exit_code == 2 and "INTERPLAB_LLM_BASE_URL" in res.output
    res = runner.invoke(app, ["features", "score", str(planted.path), "--scorers", "detektion"])
    assert res.exit_code == 2 and "valid" in res.output
    res = runner.invoke(app, ["features", "score", str(planted.path), "--features", "a,b"])
    assert res.exit_code == 2 and "--features" in res.output
    res = runner.invoke(
        app, ["features", "score", str(planted.path.parent / "none.db"), "--scorers", "baseline"]
    )
    assert res.exit_code == 2
