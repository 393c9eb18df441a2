"""The autointerp metric of `sae bench` (`interplab.features.autointerp`) on a hand-checked planted case."""

import json
import re
import statistics

import pytest
import torch

from interplab.features.autointerp import (
    BASELINE_METRIC,
    AutointerpConfig,
    autointerp_metric,
    autointerp_score,
)
from interplab.features.llm import Completion
from interplab.features.reader import FeatureReader
from interplab.sae.bench import bench_saes
from tests.features.planted import planted_sae


def hand_sae(model, *, with_constant: bool):
    """Feature 0 fires exactly on token 0 (with one constant activation), feature 1 (``with_constant``) fires
    on every token with the same activation, features 2 and 3 never fire."""
    sae = planted_sae(model, 4)
    with torch.no_grad():
        sae.W_enc[:, 1] = 0.0
        sae.b_enc[1] = 1.5 if with_constant else -1e3
        sae.W_enc[:, 2:] = 0.0
        sae.b_enc[2:] = -1e3
    return sae


def test_autointerp_baseline_equals_the_hand_computation(tmp_path, model, tokens):
    """By hand: feature 0's baseline explanation names token 0 and its activation is constant on token 0 and 0
    elsewhere, so the token-list simulation equals the activation up to scale: correlation exactly 1. Feature
    1's activation is the same on every token: zero variance, correlation 0 (by `correlation`'s definition).
    Dead features are not sampled. Mean over the two: 0.5."""
    sae = hand_sae(model, with_constant=True)
    got = autointerp_score(tmp_path / "a.db", model, sae, tokens, cfg=AutointerpConfig(n_features=10))
    assert list(got) == [BASELINE_METRIC]
    assert got[BASELINE_METRIC] == pytest.approx(0.5, abs=1e-9)
    with FeatureReader(tmp_path / "a.db") as r:
        (e0,) = r.explanations(0)
        assert e0["explainer"] == "baseline:token-enrichment" and e0["scores"]["baseline"] == pytest.approx(
            1.0
        )
        assert r.explanations(1)[0]["scores"]["baseline"] == 0.0
        assert r.explanations(2) == [] and r.explanations(3) == []
    # a rerun resumes from the stored database and gives the same number
    again = autointerp_score(tmp_path / "a.db", model, sae, tokens, cfg=AutointerpConfig(n_features=10))
    assert again == got


def test_autointerp_in_bench_with_reseed_noise(tmp_path, model, tokens):
    """Two 'seeds' of one configuration: scores 0.5 (above) and 1.0 (feature 0 alone); the bench table
    reports mean 0.75, SD = stdev(0.5, 1.0) and CV = SD / mean."""
    saes = {
        "s0": ("g", hand_sae(model, with_constant=True)),
        "s1": ("g", hand_sae(model, with_constant=False)),
    }
    metric = autointerp_metric(model, tokens, workdir=tmp_path / "ai", cfg=AutointerpConfig(n_features=10))
    batches = [tokens[i : i + 8] for i in range(0, len(tokens), 8)]
    res = bench_saes(model, saes, batches, extra={"autointerp": metric})
    assert [r["metrics"][BASELINE_METRIC] for r in res.rows] == pytest.approx([0.5, 1.0])
    g = res.groups["g"][BASELINE_METRIC]
    sd = statistics.stdev([0.5, 1.0])
    assert (
        g["mean"] == pytest.approx(0.75)
        and g["sd"] == pytest.approx(sd)
        and g["cv"] == pytest.approx(sd / 0.75)
    )
    assert BASELINE_METRIC in res.markdown().splitlines()[0]
    assert sorted(p.name for p in (tmp_path / "ai").glob("*.db")) == ["s0.db", "s1.db"]


def test_autointerp_with_a_judge_backend_reports_detection_and_fuzzing(tmp_path, model, tokens):
    """With a backend, the LLM explainer and the detection and fuzzing scorers run, named as such. By hand: a
    judge that answers 'yes' to every text has true-positive rate 1 and true-negative rate 0, balanced accuracy
    exactly 0.5 on both scorers for every feature (each has activating and non-activating texts)."""

    class YesJudge:
        name = "yes-judge"

        def complete(self, messages, *, max_tokens=256, temperature=0.0, top_logprobs=0):
            user = messages[-1]["content"]
            n = len(re.findall(r"^Text \d+:", user, re.M))
            text = json.dumps([1] * n) if user.startswith("Explanation:") else "the token 'x'"
            return Completion(text, 1, 1)

    sae = planted_sae(model, 4)
    got = autointerp_score(
        tmp_path / "b.db", model, sae, tokens, backend=YesJudge(), cfg=AutointerpConfig(n_features=10)
    )
    assert got == {"autointerp_detection": 0.5, "autointerp_fuzzing": 0.5}


def test_autointerp_config_rejects_a_bad_sample_size():
    with pytest.raises(ValueError, match="n_features must be a positive int, got 0"):
        AutointerpConfig(n_features=0)
