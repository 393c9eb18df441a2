"""Steering through decoder directions, and automatic interpretation on a planted database."""

from __future__ import annotations

import json

import pytest
import torch

from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from interplab.features.explain import (
    Explanation,
    PromptExplainer,
    TokenEnrichmentExplainer,
    TokenListSimulator,
    auto_interp,
    score_explanation,
)
from interplab.features.reader import FeatureReader
from interplab.features.steer import SteerMode, steer_generate, steering_hook
from interplab.features.writer import FeatureWriter
from interplab.runs import Kind, read_json
from tests.features.planted import make_sae, planted_sae


def _unembed_sae(model, tokens_by_feature):
    sae = make_sae(32, len(tokens_by_feature), hook_name="blocks.0.hook_resid_post")
    with torch.no_grad():
        for f, u in enumerate(tokens_by_feature):
            sae.W_dec[f] = model.W_U[:, u] / model.W_U[:, u].norm()
    return sae


def test_adding_an_unembedding_direction_makes_the_model_say_that_token(model, tmp_path):
    sae = _unembed_sae(model, [7, 21])
    prompt = torch.tensor([1, 2, 3, 4])
    res = steer_generate(model, sae, prompt, feature=1, value=200.0, mode=SteerMode.ADD, max_new_tokens=6)
    assert res.steered == [21] * 6
    assert res.baseline != res.steered
    zero = steer_generate(model, sae, prompt, feature=1, value=0.0, mode="add", max_new_tokens=6)
    assert zero.steered == zero.baseline
    assert "#21" in res.steered_text
    res.save(tmp_path / "steer.json")
    saved = read_json(tmp_path / "steer.json", expect=Kind.STEERING)
    assert saved["mode"] == "add" and saved["steered"] == [21] * 6 and saved["version"] == 1


def test_clamp_sets_the_feature_activation(model):
    sae = planted_sae(model, 6)
    with torch.no_grad():
        sae.W_dec.copy_(sae.W_enc.T)  # unit-norm tied directions: clamping moves the pre-activation exactly
    x = model.W_E[torch.tensor([[2, 3, 2, 5]])].detach()
    out = steering_hook(sae, 2, 4.0, SteerMode.CLAMP)(x, None)
    acts = sae.encode(out)[..., 2]
    torch.testing.assert_close(acts[0, [0, 2]], torch.tensor([4.0, 4.0]))


def test_steering_bad_feature_is_refused(model):
    sae = _unembed_sae(model, [7])
    with pytest.raises(ValueError, match="out of range"):
        steer_generate(model, sae, torch.tensor([1, 2]), feature=3, value=1.0)


def test_auto_interp_recovers_planted_tokens_and_keeps_human_labels(tmp_path, model, tokens):
    sae = planted_sae(model, 6)
    cfg = FeatureBuildConfig(top_k=5, n_samples=6, window_left=3, window_right=1, batch_size=8)
    build_feature_db(tmp_path / "f.db", model, sae, tokens, cfg)
    store, writer = FeatureReader(tmp_path / "f.db"), FeatureWriter(tmp_path / "f.db")
    writer.set_label(0, "my own words")
    result = auto_interp(writer, TokenEnrichmentExplainer(k=1))
    assert result.skipped_human == [0]
    for j in range(1, 6):
        assert result.explanations[j] == f"fires on '#{j}'"
        assert result.scores[j] == pytest.approx(1.0)
    assert store.feature(0)["label"]["explanation"] == "my own words"
    assert store.feature(3)["label"]["source"] == "auto:token-enrichment"
    # a wrong explanation scores low; the simulator parses quoted token names
    wrong = score_explanation(
        Explanation("fires on '#1'"), TokenListSimulator(), store.feature(3)["samples"], store.vocab()
    )
    assert wrong < 0.5
    result.save(tmp_path / "interp.json")
    assert json.loads((tmp_path / "interp.json").read_text())["explainer"] == "token-enrichment"
    assert read_json(tmp_path / "interp.json", expect=Kind.AUTO_INTERP)["version"] == 1


def test_prompt_explainer_marks_the_peak_token(tmp_path, model, tokens):
    sae = planted_sae(model, 3)
    build_feature_db(
        tmp_path / "f.db", model, sae, tokens, FeatureBuildConfig(top_k=3, window_left=2, batch_size=8)
    )
    seen = []

    def complete(prompt: str) -> str:
        seen.append(prompt)
        return " the token two \n"

    result = auto_interp(FeatureWriter(tmp_path / "f.db"), PromptExplainer(complete), features=[2])
    assert result.explanations[2] == "the token two"
    assert "<<#2>>" in seen[0]


def test_steered_generation_matches_a_full_forward_loop(model):
    torch.manual_seed(4)
    sae = make_sae(32, 8, hook_name="blocks.0.hook_resid_post")
    prompt = torch.tensor([3, 1, 4, 1, 5])
    res = steer_generate(model, sae, prompt, feature=5, value=3.0, mode=SteerMode.CLAMP, max_new_tokens=5)
    hook = steering_hook(sae, 5, 3.0, SteerMode.CLAMP)
    toks = prompt.clone()
    for _ in range(5):
        logits = model.run_with_hooks(toks[None], fwd_hooks=[("blocks.0.hook_resid_post", hook)])
        toks = torch.cat([toks, logits[0, -1].argmax()[None]])
    assert res.steered == toks[5:].tolist()


@pytest.mark.parametrize("mode", [SteerMode.ADD, SteerMode.CLAMP])
@pytest.mark.parametrize("strength,max_act", [(1.0, 0.8), (2.5, 1.2), (-1.0, 3.0)])
def test_strength_is_a_multiple_of_the_max_activation(model, mode, strength, max_act):
    sae = _unembed_sae(model, [7, 21])
    prompt = torch.tensor([1, 2, 3, 4])
    rel = steer_generate(model, sae, prompt, 1, strength, mode, max_act=max_act, max_new_tokens=5)
    absolute = steer_generate(model, sae, prompt, 1, value=strength * max_act, mode=mode, max_new_tokens=5)
    assert rel.steered == absolute.steered and rel.value == pytest.approx(strength * max_act)
    assert rel.strength == strength and rel.max_act == max_act and absolute.strength is None
    assert f"{strength:g}x max activation" in rel.describe()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"strength": float("nan"), "max_act": 1.0}, "finite"),
        ({"strength": float("inf"), "max_act": 1.0}, "finite"),
        ({"value": float("nan")}, "finite"),
        ({"value": float("-inf")}, "finite"),
        ({"strength": 1.0}, "max_act"),  # a relative strength needs the feature's scale
        ({"strength": 1.0, "max_act": 0.0}, "never fired"),
        ({"strength": 1.0, "max_act": float("nan")}, "never fired"),
        ({"value": 1.0, "max_act": 1.0}, "not both"),
        ({"value": 1e308}, "overflows"),
    ],
)
def test_bad_steering_strengths_are_refused(model, kwargs, match):
    sae = _unembed_sae(model, [7])
    with pytest.raises(ValueError, match=match):
        steer_generate(model, sae, torch.tensor([1, 2]), 0, **kwargs)
