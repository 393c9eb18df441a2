"""`interplab features score DB` (the scorers' subcommand)."""

from __future__ import annotations

import pytest
import torch
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
    # and it says what to run when nothing was scored (a database with no explanation yet scores nothing)
    assert f"features explain {planted.path}" in again.output.replace("\n", "")


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


def test_score_with_an_llm_judge_caches_its_replies_so_a_rerun_calls_nothing_twice(planted, monkeypatch):
    """The judge (the planted rule, served over the OpenAI protocol on loopback) is reached through the
    database's response cache: scores lost after their calls were made (here: deleted) cost no call again."""
    from sqlalchemy import delete

    from interplab.features import schema as S
    from interplab.features.planted import server_reply
    from interplab.features.writer import FeatureWriter
    from tests.features.llm_server import LLMServer

    with LLMServer(server_reply()) as server:
        monkeypatch.setenv("INTERPLAB_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("INTERPLAB_LLM_MODEL", "judge")
        monkeypatch.setenv("INTERPLAB_LLM_API_KEY", "test-key")
        args = ["features", "score", str(planted.path), "--scorers", "detection", "--features", "0-2"]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        calls = server.n_requests
        assert calls > 0 and "scored 6 " in res.output  # oracle and shuffled explanations of 3 features
        with FeatureReader(planted.path) as r:
            first = {e["id"]: r.scores(e["id"])[0]["value"] for f in range(3) for e in r.explanations(f)}
        with FeatureWriter(planted.path) as w, w.engine.begin() as c:
            c.execute(delete(S.explanation_scores))
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
        assert server.n_requests == calls  # every reply came from the cache
        with FeatureReader(planted.path) as r:
            second = {e["id"]: r.scores(e["id"])[0]["value"] for f in range(3) for e in r.explanations(f)}
        assert second == first


def test_the_summary_of_undefined_scores_says_so_instead_of_zero():
    """A scorer with no defined score (e.g. embedding where no non-activating context exists) read 0.000."""
    from interplab.cli.features import score_means

    nan = float("nan")
    assert score_means({"embedding": [nan, nan], "baseline": [0.5, 0.25]}) == (
        "embedding n/a (2 of 2 undefined), baseline 0.375"
    )
    assert score_means({"detection": [1.0, nan, 0.5]}) == "detection 0.750 (1 of 3 undefined)"
    assert score_means({}) == ""


def test_the_demo_scores_with_the_llm_when_one_is_configured():
    """`interplab demo` scores its features with the baseline offline, and with the LLM's detection and
    fuzzing when INTERPLAB_LLM_* configure one (the baseline reads only quoted tokens, so it scores an LLM's
    wording near 0); each choice is a valid scorer list for the backend it has."""
    from interplab.cli.demo import demo_scorers
    from interplab.features.planted import RuleJudgeBackend
    from interplab.features.scorers import BaselineScorer, DetectionScorer, FuzzingScorer, make_scorers

    offline = demo_scorers({})
    assert [type(s) for s in make_scorers(offline.split(","), None)] == [BaselineScorer]
    for env in ({"INTERPLAB_LLM_BASE_URL": "http://127.0.0.1:9/v1"}, {"INTERPLAB_LLM_LOCAL": "/models/m"}):
        names = demo_scorers(env).split(",")
        made = {type(s) for s in make_scorers(names, RuleJudgeBackend())}
        assert {DetectionScorer, FuzzingScorer, BaselineScorer} == made, (env, names)


def test_feature_lists_naming_features_the_database_lacks_are_refused_before_any_work(planted):
    """`--features 8-12` on a 10-feature database said `error: 10` (explain) or silently skipped 10-12 (score)."""
    with FeatureReader(planted.path) as r:
        before = [len(r.explanations(f)) for f in range(10)]
    res = runner.invoke(app, ["features", "explain", str(planted.path), "--features", "0,8-12,20"])
    assert res.exit_code == 2, res.output
    assert "features 10-12, 20 not in the database, which holds 10 features (0-9)" in res.output.replace(
        "\n", ""
    )
    with FeatureReader(planted.path) as r:
        assert [len(r.explanations(f)) for f in range(10)] == before  # nothing explained on the way
    res = runner.invoke(
        app, ["features", "score", str(planted.path), "--scorers", "baseline", "--features", "9-11"]
    )
    assert res.exit_code == 2 and "features 10-11 not in the database" in res.output.replace("\n", ""), (
        res.output
    )
    with FeatureReader(planted.path) as r:
        assert not any(r.scores(e["id"]) for f in range(10) for e in r.explanations(f))


def test_the_demos_commands_give_every_feature_that_fires_an_explanation_with_a_score(tmp_path, monkeypatch):
    """Issue 18's "done": the demo's features have explanations with scores by default (the built-in baseline
    offline). The demo's own stage-4 commands on a database with live and dead features."""
    from interplab.cli.demo import explain_and_score_commands
    from interplab.features import FeatureBuildConfig
    from interplab.features.build import build_feature_db
    from interplab.sae import SAEConfig, create_sae
    from tests.features.planted import tiny_model

    for var in ("INTERPLAB_LLM_BASE_URL", "INTERPLAB_LLM_MODEL", "INTERPLAB_LLM_LOCAL"):
        monkeypatch.delenv(var, raising=False)
    model = tiny_model()
    sae = create_sae(SAEConfig(d_in=32, d_sae=24, architecture="relu", hook_name="blocks.0.hook_resid_post"))
    with torch.no_grad():  # three latents that can never fire
        sae.W_enc[:, :3] = 0.0
        sae.b_enc[:3] = -1.0
    tokens = torch.randint(0, 40, (24, 16), generator=torch.Generator().manual_seed(1))
    db = tmp_path / "features.db"
    build_feature_db(db, model, sae, tokens, FeatureBuildConfig(top_k=4, window_left=2, batch_size=8))
    for args in explain_and_score_commands(db, {}):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
    with FeatureReader(db) as r:
        fired = {f for f in range(24) if r.feature(f)["n_fires"] > 0}
        assert {0, 1, 2}.isdisjoint(fired) and len(fired) >= 10
        for f in range(24):
            exps = r.explanations(f)
            assert bool(exps) == (f in fired), f
            for e in exps:
                assert e["explainer"].startswith("baseline:")  # pages say it is the baseline
                assert [s["scorer"] for s in r.scores(e["id"])] == ["baseline"], f
