"""Causal scrubbing on hand-built models whose circuit is known by construction."""

import pytest
import torch

from interplab.circuits.planted import induction_data, planted_induction
from interplab.scrub import Claim, Hypothesis, ScrubConfig, scrub
from interplab.scrub.induction import copied_token, current_token, induction_steps, induction_task, next_token

CFG = ScrubConfig(n_examples=600, n_seeds=2, per_claim=False, batch_size=300)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = planted_induction()
    tokens, _, _ = induction_data(2000)
    return model, induction_task(tokens)


def test_trivial_hypothesis_recovers_everything(setup):
    model, task = setup
    r = scrub(model, task, Hypothesis.trivial(), CFG)
    # the same computation in other batch layouts: equal up to float32 rounding (bit-equal on some CPUs only)
    assert r.loss_scrubbed.mean == pytest.approx(r.loss_original.mean, rel=1e-6)
    assert r.recovered.mean == pytest.approx(1.0, abs=1e-6)


def test_empty_hypothesis_is_the_random_baseline(setup):
    model, task = setup
    r = scrub(model, task, Hypothesis.empty(), CFG)
    assert r.loss_scrubbed.mean == r.loss_random.mean
    assert r.recovered.mean == 0.0


def test_the_true_hypothesis_recovers_at_least_95_percent(setup):
    model, task = setup
    # by construction: a1.0 attends (weight >= 0.96) to the token after the previous occurrence, so the
    # original loss is ~0.005; a random other input predicts its own next token, wrong with p = 15/16: ~7.4
    r = scrub(model, task, induction_steps()[-1], CFG)
    assert r.loss_original.mean < 0.02
    assert 6.5 < r.loss_random.mean < 8.5
    assert r.recovered.mean >= 0.95


@pytest.mark.parametrize("step", range(4))
def test_every_refinement_of_the_true_story_keeps_95_percent(setup, step):
    model, task = setup
    assert scrub(model, task, induction_steps()[step], CFG).recovered.mean >= 0.95


def test_dropping_the_key_path_recovers_clearly_less(setup):
    model, task = setup
    # K from a random sequence: a1.0 finds the current token there (p = 9/16) at an unrelated position, or
    # attends nearly uniformly; either way it copies a wrong token or a blur of ten: between 15% and 50%
    wrong = Hypothesis(
        Claim(
            "logits",
            children=[
                Claim(
                    "a1.0",
                    next_token,
                    children=[Claim("a1.0.q", current_token), Claim("a1.0.v", copied_token)],
                )
            ],
        ),
        name="no key",
    )
    r = scrub(model, task, wrong, CFG)
    assert 0.15 < r.recovered.mean < 0.5


def test_claiming_the_noise_head_recovers_nothing(setup):
    model, task = setup
    # the noise head contributes logits of size ~0.5: claiming it instead of a1.0 leaves a1.0 on a random input
    noise = Hypothesis(Claim("logits", children=[Claim("a1.1", next_token)]), name="noise head")
    r = scrub(model, task, noise, CFG)
    assert abs(r.recovered.mean) < 0.05


def test_per_claim_breakdown_and_report(setup, tmp_path):
    model, task = setup
    wrong = Hypothesis(
        Claim("logits", children=[Claim("a1.0", current_token)]), name="copies the current token"
    )
    r = scrub(model, task, wrong, ScrubConfig(n_examples=300, n_seeds=2, batch_size=300))
    rows = {row.claim: row for row in r.per_claim}
    assert set(rows) == {"logits/a1.0", "structure"}
    assert rows["structure"].recovered.mean >= 0.95  # a1.0 on the reference input: all that matters
    assert rows["logits/a1.0"].recovered.mean < 0.3  # resampling on the wrong feature breaks it
    r.save(tmp_path / "run")
    assert (tmp_path / "run" / "report.json").read_text().count("logits/a1.0") >= 1
    assert "<table>" in (tmp_path / "run" / "report.html").read_text()
    assert "loss recovered" in r.table()
    assert r.forwards["clean_example_forwards"] < r.forwards["naive_example_forwards"]


def test_independent_random_inputs_per_path(setup):
    model, task = setup
    per_path = ScrubConfig(n_examples=600, n_seeds=2, per_claim=False, batch_size=300, random_per_path=True)
    assert scrub(model, task, induction_steps()[-1], per_path).recovered.mean >= 0.95
    empty = scrub(model, task, Hypothesis.empty(), per_path)
    # every edge into the logits from its own random input: a1.0 alone decides, so still ~the random baseline
    assert abs(empty.recovered.mean) < 0.05
