"""Scorers: their metrics against hand computations, score storage, resuming after a failing backend."""

from __future__ import annotations

import math
import random

import pytest
import torch

from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from interplab.features.planted import ORACLE, SHUFFLED, RuleJudgeBackend, build_planted_db
from interplab.features.reader import FeatureReader
from interplab.features.scorers import (
    BaselineScorer,
    DetectionScorer,
    FuzzingScorer,
    ScorerError,
    SimulationScorer,
    activating_windows,
    auc,
    balanced_accuracy,
    expected_level,
    make_scorers,
    non_activating_windows,
    parse_binary_list,
    score_features,
    scorer_rng,
)
from interplab.features.writer import FeatureWriter, copy_database
from tests.features.planted import planted_sae, tiny_model


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_planted_db(tmp_path_factory.mktemp("planted") / "planted.db")


@pytest.fixture
def db(planted, feature_db):
    """A fresh copy of the planted database (tests write scores into it), on each backend."""
    copy = feature_db("planted.db")
    copy_database(planted.path, copy)
    return copy


def test_balanced_accuracy_and_auc_equal_hand_computations():
    truth = [True, True, True, False, False]
    pred = [1, 1, 0, 0, 1]
    assert balanced_accuracy(truth, pred) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert math.isnan(balanced_accuracy([True, True], [1, 0]))
    # pairs (pos, neg): (3,1) win, (3,2) win, (2,1) win, (2,2) tie, (0,1) loss, (0,2) loss -> 3.5 / 6
    assert auc([3, 2, 0, 1, 2], [True, True, True, False, False]) == pytest.approx(3.5 / 6)
    assert auc([1, 1], [True, False]) == 0.5


def test_parsing_replies():
    assert parse_binary_list("sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_binary_list("[1, 0] then [0, 1, 1]", 3) == [0, 1, 1]
    assert parse_binary_list("[1, 2, 0]", 3) is None
    assert parse_binary_list("[1.0, 0, 1]", 3) is None
    assert parse_binary_list("no list", 2) is None
    top = {"3": math.log(0.5), " 5": math.log(0.25), "x": math.log(0.25)}
    assert expected_level(top) == pytest.approx((3 * 0.5 + 5 * 0.25) / 0.75)
    assert expected_level({"a": 0.0}) is None


def test_contexts_are_spread_over_quantiles_and_negatives_do_not_fire(planted):
    with FeatureReader(planted.path) as r:
        rec = r.feature(0)
        acts = planted.activations()[..., 0]
        pos = activating_windows(rec, 10, random.Random(0))
        assert len(pos) == 10 and all(w.firing for w in pos)
        got = sorted(round(max(w.acts), 4) for w in pos)
        samples = sorted(round(c["act"], 4) for c in rec["samples"])
        assert got[0] == samples[0] and got[-1] == samples[-1]  # both ends of the distribution
        neg = non_activating_windows(rec, r, 10, random.Random(0))
        assert len(neg) == 10
        firing_tokens = set(planted.tokens[acts > 0].tolist())
        assert all(not firing_tokens.intersection(w.tokens) for w in neg)


def test_score_storage_round_trip_and_replace(db):
    with FeatureWriter(db) as w:
        with w.reader() as r:
            assert r.scores(1) == []
            eid = r.explanations(0)[0]["id"]
        w.add_score(eid, "detection", 0.75, n=20, details={"a": 1}, backend="b", prompt_version="p", seed=0)
        w.add_score(eid, "detection", 0.5, n=10, details={}, backend="b", prompt_version="p", seed=0)
        w.add_score(eid, "detection", float("nan"), n=0, details={}, backend="b", prompt_version="p", seed=1)
        with pytest.raises(KeyError, match="no explanation with id 9999"):
            w.add_score(9999, "detection", 0.5, n=1, details={}, backend="b", prompt_version="p", seed=0)
    with FeatureReader(db) as r:
        rows = r.scores(eid)
        assert [(s["value"], s["n"], s["seed"]) for s in rows][0] == (0.5, 10, 0)
        assert math.isnan(rows[1]["value"]) and len(rows) == 2
        assert r.explanations(0)[0]["scores"]["detection"] != 0.75


def test_a_database_without_score_tables_reads_empty(tmp_path, planted):
    model = tiny_model()
    build_feature_db(tmp_path / "f.db", model, planted_sae(model, 4), torch.randint(0, 40, (4, 16)),
                     FeatureBuildConfig(loss_effect=False))  # fmt: skip
    with FeatureReader(tmp_path / "f.db") as r:
        assert r.explanations(0) == [] and r.scores(1) == []
    with FeatureWriter(tmp_path / "f.db") as w:
        assert score_features(w, [BaselineScorer()]) == {}


class FlakyBackend(RuleJudgeBackend):
    """Fails (as an HTTP backend would, e.g. a 401) after ``ok`` calls."""

    def __init__(self, ok: int) -> None:
        super().__init__()
        self.ok, self.calls = ok, 0

    def complete(self, messages, **kw):
        self.calls += 1
        if self.calls > self.ok:
            raise RuntimeError("the endpoint refused the key")
        return super().complete(messages, **kw)


def test_a_failing_backend_loses_nothing_and_a_rerun_resumes(db):
    flaky = FlakyBackend(ok=13)  # detection makes 4 calls per explanation: fails in the 4th explanation
    with FeatureWriter(db) as w, pytest.raises(RuntimeError, match="refused the key"):
        score_features(w, [DetectionScorer(flaky)], seed=3)
    with FeatureReader(db) as r:
        stored = [s for f in range(10) for e in r.explanations(f) for s in r.scores(e["id"])]
    assert len(stored) == 3
    good = FlakyBackend(ok=10**6)
    with FeatureWriter(db) as w:
        new = score_features(w, [DetectionScorer(good)], seed=3)
    assert len(new) == 17 and good.calls == 17 * 4
    # the three scored before the failure are what an uninterrupted run gives (same seed, same streams)
    again = FlakyBackend(ok=10**6)
    with FeatureWriter(db) as w:
        assert score_features(w, [DetectionScorer(again)], seed=3) == {} and again.calls == 0
        fresh = {}
        with w.reader() as r:
            for e in r.explanations(0) + r.explanations(1):
                rec = {**r.feature(e["feature"]), "window_left": 12}
                fresh[e["id"]] = DetectionScorer(again).score(
                    e["text"], rec, r, rng=scorer_rng(3, e["feature"], e["id"], "detection")
                )
            for eid, res in fresh.items():
                assert (
                    r.scores(eid)[0]["value"] == res.value
                    and r.scores(eid)[0]["details"]["pred"] == res.details["pred"]
                )


def test_simulation_needs_logprobs(planted):
    class NoLogprobs(RuleJudgeBackend):
        def complete(self, messages, **kw):
            return super().complete(messages, **{**kw, "top_logprobs": 0})

    with FeatureReader(planted.path) as r:
        rec = {**r.feature(0), "window_left": 12}
        with pytest.raises(ScorerError, match="needs log-probs"):
            SimulationScorer(NoLogprobs()).score("x", rec, r, rng=random.Random(0))


def test_an_unreadable_judge_is_an_error(planted):
    class Chatty(RuleJudgeBackend):
        def complete(self, messages, **kw):
            reply = super().complete(messages, **kw)
            return type(reply)("I think they all match!", 1, 1, None)

    with FeatureReader(planted.path) as r:
        rec = {**r.feature(0), "window_left": 12}
        with pytest.raises(ScorerError, match="JSON list"):
            FuzzingScorer(Chatty()).score("x", rec, r, rng=random.Random(0))


def test_make_scorers_names_what_is_valid():
    with pytest.raises(ValueError, match="valid"):
        make_scorers(["detektion"], None)
    with pytest.raises(ScorerError, match="INTERPLAB_LLM_BASE_URL"):
        make_scorers(["detection"], None)
    assert [s.name for s in make_scorers(["baseline", "embedding"], None)] == ["baseline", "embedding"]


def test_scores_depend_on_the_seed_only_through_sampling(db):
    backend = RuleJudgeBackend()
    with FeatureWriter(db) as w:
        a = score_features(w, [DetectionScorer(backend)], features=[0], seed=0)
        b = score_features(w, [DetectionScorer(backend)], features=[0], seed=1)
    with FeatureReader(db) as r:
        exps = {e["explainer"]: e for e in r.explanations(0)}
        assert {s["seed"] for s in r.scores(exps[ORACLE]["id"])} == {0, 1}
    ka = sorted(a)
    assert ka == sorted(b) and {exps[SHUFFLED]["id"], exps[ORACLE]["id"]} == {k[0] for k in ka}
    assert a[(exps[ORACLE]["id"], "detection")].value == b[(exps[ORACLE]["id"], "detection")].value == 1.0
