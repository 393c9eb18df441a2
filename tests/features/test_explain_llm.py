"""Explaining features into the database (`explain_features`, `LLMExplainer`, the baseline), its storage,
search, the CLI and the feature pages, on the planted SAE whose feature j fires exactly on token j."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.features.explain import (
    PROMPT_VERSION,
    LLMExplainer,
    TokenEnrichmentExplainer,
    TokenListSimulator,
    explain_features,
    explainer_backend,
    highlight,
)
from interplab.features.llm import CachedBackend, LLMError, OpenAIBackend
from interplab.features.reader import FeatureReader
from interplab.features.writer import FeatureWriter, copy_database
from tests.features.llm_server import LLMServer
from tests.features.test_llm import KEY_ENV, planted_db_fixture  # noqa: F401  (the planted_db fixture)

runner = CliRunner()


def rule_reply(messages, body) -> str:
    """What a good explainer would say: the first marked token of the prompt."""
    return f"fires on '{re.search(r'<<(.+?)>>', messages[-1]['content']).group(1)}'"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    with LLMServer(rule_reply) as s:
        yield s


def llm(server) -> OpenAIBackend:
    return OpenAIBackend(server.base_url, "test-model", api_key_env=KEY_ENV, backoff_s=0.01)


def test_the_prompt_marks_exactly_the_tokens_above_the_fraction(planted_db):
    store = FeatureReader(planted_db)
    rec, vocab = store.feature(2), store.vocab()
    explainer = LLMExplainer(llm_stub(), n_top=3, n_sampled=2, mark_fraction=0.5)
    prompt = explainer.messages(rec, vocab)[-1]["content"]
    threshold = 0.5 * rec["max_act"]
    for c in rec["top"][:3]:
        text, marked = highlight(c["tokens"], c["acts"], vocab, threshold)
        want = [
            (vocab[t], round(a, 2))
            for t, a in zip(c["tokens"], c["acts"], strict=True)
            if t >= 0 and a >= threshold
        ]
        assert marked == want and want and all(s == "#2" for s, _ in want)  # the planted token only
        assert repr(text) in prompt and "<<#2>>" in text
    assert prompt.count("activations:") == 3 + 2
    assert "Top-activating examples" in prompt and "Randomly sampled" in prompt and "not fire" not in prompt


def test_the_contrastive_prompt_adds_text_where_the_feature_is_silent(planted_db):
    store = FeatureReader(planted_db)
    rec, vocab = store.feature(1), store.vocab()
    prompt = LLMExplainer(llm_stub(), contrastive=True).messages(rec, vocab)[-1]["content"]
    silent = prompt.split("does not fire at all:\n")[1].split("\n\n")[0].splitlines()
    assert silent
    for line in silent:  # each snippet is a stretch of a window where the activation is 0 at every token
        snippet = eval(line.split(". ", 1)[1])  # noqa: S307 (a repr written by the prompt)
        assert "#1" not in re.findall(r"#\d+", snippet)
        windows = [
            "".join(vocab[t] for t, a in zip(c["tokens"], c["acts"], strict=True) if t >= 0)
            for c in rec["top"] + rec["samples"]
        ]
        assert any(snippet in w for w in windows)


def llm_stub():
    class Stub:
        name = "stub"

        def complete(self, messages, **kw):
            raise AssertionError("not called")

    return Stub()


def test_llm_explanations_are_stored_with_backend_and_labels(server, planted_db):
    explainer = LLMExplainer(llm(server))
    with FeatureWriter(planted_db) as w:
        ids = explain_features(w, explainer)
    assert sorted(ids) == [0, 1, 2, 3] and server.n_requests == 4
    store = FeatureReader(planted_db)
    for f in range(4):
        (e,) = store.explanations(f)
        assert e["id"] == ids[f] and e["text"] == f"fires on '#{f}'"
        assert (e["explainer"], e["backend"], e["prompt_version"]) == (
            "llm",
            f"openai:test-model@{server.base_url.split('/')[2]}",
            PROMPT_VERSION,
        )
        assert e["backend"] == explainer_backend(explainer)  # what autointerp_metric looks explanations up by
        assert e["meta"]["prompt_tokens"] > 0 and e["scores"] == {}
        assert store.labels()[f] == {
            "feature": f,
            "explanation": e["text"],
            "source": "auto:llm",
            "score": None,
        }


def test_explaining_resumes_and_keeps_what_was_stored_when_the_key_goes(server, planted_db, monkeypatch):
    with FeatureWriter(planted_db) as w:
        w.set_label(3, "a human label")
        assert sorted(explain_features(w, LLMExplainer(llm(server)), features=[0, 1])) == [0, 1]
        monkeypatch.delenv(KEY_ENV)
        with pytest.raises(LLMError, match=KEY_ENV):
            explain_features(w, LLMExplainer(llm(server)))
        store = FeatureReader(planted_db)
        assert [len(store.explanations(f)) for f in range(4)] == [1, 1, 0, 0]  # nothing lost
        monkeypatch.setenv(KEY_ENV, "test-key")
        progress = []
        assert sorted(
            explain_features(w, LLMExplainer(llm(server)), progress=lambda *a: progress.append(a))
        ) == [2, 3]
        assert progress == [(1, 2), (2, 2)] and server.n_requests == 4
        assert explain_features(w, LLMExplainer(llm(server))) == {} and server.n_requests == 4
        # another prompt version is explained again; the contrastive explainer is another explainer
        assert len(explain_features(w, LLMExplainer(llm(server), prompt_version="v-test"))) == 4
        assert len(explain_features(w, LLMExplainer(llm(server), contrastive=True))) == 4
    store = FeatureReader(planted_db)
    assert store.labels()[3]["source"] == "human"  # never overwritten
    assert {e["explainer"] for e in store.explanations(0)} == {"llm", "llm-contrastive"}


def test_cached_responses_make_a_rerun_free(server, planted_db, tmp_path):
    with FeatureWriter(planted_db) as w:
        explain_features(w, LLMExplainer(CachedBackend(llm(server), w)))
        assert server.n_requests == 4
        cached = CachedBackend(llm(server), w)
        assert len(explain_features(w, LLMExplainer(cached, prompt_version="again"))) == 4
        assert server.n_requests == 4 and (cached.hits, cached.misses) == (4, 0)
    copy = tmp_path / "copy.db"
    copy_database(planted_db, copy)  # the cache travels with the database (onto another backend too)
    with FeatureWriter(copy) as w:
        explain_features(w, LLMExplainer(CachedBackend(llm(server), w), prompt_version="copy"))
    assert server.n_requests == 4


def test_baseline_explanations_say_they_are_the_baseline(planted_db):
    with FeatureWriter(planted_db) as w:
        ids = explain_features(w, TokenEnrichmentExplainer(k=1), simulator=TokenListSimulator())
    store = FeatureReader(planted_db)
    for f in range(4):
        (e,) = store.explanations(f)
        assert (e["text"], e["explainer"], e["backend"]) == (
            f"fires on '#{f}'",
            "baseline:token-enrichment",
            "none",
        )
        assert e["backend"] == explainer_backend(TokenEnrichmentExplainer(k=1))
        assert e["id"] == ids[f] and e["meta"]["tokens"] == [f]
        assert e["meta"]["simulation_correlation"] == pytest.approx(1.0)  # the planted rule, exactly
        assert store.labels()[f]["source"] == "auto:baseline:token-enrichment"
        assert store.labels()[f]["score"] == pytest.approx(1.0)


def test_search_explanations(planted_db):
    with FeatureWriter(planted_db) as w:
        assert w.reader().search_explanations("fires") == []  # no table yet: empty, no error
        a = w.add_explanation(
            0, "Opening brackets of calls", explainer="oracle", backend="none", prompt_version="x"
        )
        w.add_explanation(
            1, "closing 100%_literal brackets", explainer="oracle", backend="none", prompt_version="x"
        )
        w.add_explanation(2, "the word 'import'", explainer="llm", backend="b", prompt_version="x")
        with pytest.raises(ValueError, match="empty"):
            w.add_explanation(2, "  ", explainer="llm", backend="b", prompt_version="x")
    store = FeatureReader(planted_db)
    assert [h["feature"] for h in store.search_explanations("BRACKETS")] == [0, 1]
    assert [h["feature"] for h in store.search_explanations("brackets calls")] == [0]  # every word
    assert [h["feature"] for h in store.search_explanations("100%_")] == [1]  # literal % and _
    assert [h["feature"] for h in store.search_explanations("%")] == [1]
    assert store.search_explanations("   ") == [] and store.search_explanations("nothing") == []
    assert store.search_explanations("brackets", limit=1)[0]["id"] == a
    with pytest.raises(ValueError, match="at most"):
        store.search_explanations("x" * 1001)


def test_search_explanations_ranks_every_match_by_its_best_score(planted_db):
    """The best-scored match comes first even when many matches come before it by feature index, and a NaN
    score (stored as NULL) ranks with the unscored, after every number."""
    kw = dict(n=10, details={}, backend="none", prompt_version="x", seed=0)
    with FeatureWriter(planted_db) as w:
        many = [
            w.add_explanation(0, f"common word {i}", explainer="oracle", backend="none", prompt_version="x")
            for i in range(8)
        ]
        mid = w.add_explanation(1, "common middle", explainer="oracle", backend="none", prompt_version="x")
        last = w.add_explanation(3, "common best", explainer="oracle", backend="none", prompt_version="x")
        w.add_score(many[0], "detection", float("nan"), **kw)
        w.add_score(mid, "detection", 0.2, **kw)
        w.add_score(mid, "fuzzing", 0.6, **kw)
        w.add_score(last, "detection", 0.9, **kw)
    store = FeatureReader(planted_db)
    assert [h["id"] for h in store.search_explanations("common", limit=1)] == [last]
    assert [h["id"] for h in store.search_explanations("common", limit=50)] == [last, mid, *many]


def test_a_database_without_the_tables_reads_as_before(planted_db):
    store = FeatureReader(planted_db)  # read-only: nothing is created
    assert (
        store.explanations(0) == []
        and store.explained(explainer="llm", backend="b", prompt_version="v") == set()
    )
    assert "explanations" not in store.dump() and "llm_cache" not in store.dump()


def test_the_cli_says_which_backend_ran_and_where_outputs_went(server, planted_db):
    args = ["features", "explain", str(planted_db)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "backend none (the built-in baseline explainer; no LLM configured)" in r.output
    assert (
        "explained 4 features (mean score 1.000)" in r.output and "tables explanations and labels" in r.output
    )
    llm_args = [*args, "--backend", "openai", "--base-url", server.base_url, "--model", "test-model"]
    r = runner.invoke(app, [*llm_args, "--api-key-env", KEY_ENV, "--features", "0-1,3"])
    assert r.exit_code == 0, r.output
    assert f"backend openai:test-model@{server.base_url.split('/')[2]}" in r.output
    assert "explained 3 features" in r.output and "LLM calls: 3 made" in r.output
    r = runner.invoke(app, [*llm_args, "--api-key-env", KEY_ENV])
    assert "explained 1 features" in r.output and "LLM calls: 1 made" in r.output and server.n_requests == 4
    r = runner.invoke(app, [*llm_args, "--contrastive", "--api-key-env", "INTERPLAB_TEST_NO_SUCH_KEY"])
    assert r.exit_code == 1 and "INTERPLAB_TEST_NO_SUCH_KEY" in r.output and "are kept" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, [*args, "--backend", "openai"], env={"INTERPLAB_LLM_BASE_URL": ""})
    assert r.exit_code == 2 and "--base-url" in r.output
    r = runner.invoke(app, [*args, "--features", "3-1"])
    assert r.exit_code == 2 and "0-99,120" in r.output


def test_feature_pages_and_search_show_explanations_with_scores(planted_db):
    from fastapi.testclient import TestClient

    from interplab.web.app import create_app

    with FeatureWriter(planted_db) as w:
        explain_features(w, TokenEnrichmentExplainer(k=1), simulator=TokenListSimulator())
        w.add_explanation(
            1, "the <b>one</b> token", explainer="llm", backend="openai:m@h", prompt_version="v"
        )
    app = create_app([planted_db])
    client = TestClient(app, base_url="http://127.0.0.1")
    (db,) = app.state.resources.stores  # "f" for f.db, the database's name for a URL
    page = client.get(f"/db/{db}/feature/1").text
    assert 'id="explanations"' in page and "the &lt;b&gt;one&lt;/b&gt; token" in page  # escaped
    assert "baseline:token-enrichment" in page and "built-in baseline: no LLM configured" in page
    assert "correlation <b>1</b>" in page and "not scored" in page
    r = client.get(f"/db/{db}/search", params={"q": "fires"})
    assert r.status_code == 200 and 'id="explanation-hits"' in r.text
    assert all(f"feature {f}</a></td><td>fires on" in r.text for f in range(4))
    api = client.get(f"/api/db/{db}/feature/1/explanations").json()
    assert [e["text"] for e in api] == ["fires on '#1'", "the <b>one</b> token"]  # oldest first
    hits = client.get(f"/api/db/{db}/explanations", params={"q": "one token"}).json()
    assert [h["feature"] for h in hits] == [1]
    assert client.get(f"/api/db/{db}/feature/99/explanations").status_code == 404
