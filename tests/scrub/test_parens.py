"""Reproduce Redwood's published causal scrubbing numbers on the REMIX paren balancer (../shared fixture)."""

import pytest
import torch

from interplab.scrub import ScrubConfig, scrub
from interplab.scrub.parens import (
    hypothesis_1a,
    is_balanced,
    load_data,
    load_paren_model,
    paren_task,
    tokenize,
)

# published (REMIX day 4, part 2): mean loss (standard error) over 4,000 reference examples
PUBLISHED = {"original": (0.00, 0.01), "random": (4.3, 0.12), "1a": (0.52, 0.04)}


@pytest.fixture
def fixture_dir(shared_dir):
    folder = shared_dir / "fixtures" / "paren_balancer"
    if not folder.is_dir():
        pytest.skip("paren balancer fixture absent")
    return folder


def test_tokenisation_and_features_match_the_labels(fixture_dir):
    strings, labels = load_data(fixture_dir)
    assert len(strings) == 100_000
    tokens = tokenize(strings)
    assert torch.equal(is_balanced(tokens), labels)  # the features implement the data set's semantics
    assert tokenize(["(()"])[0, :6].tolist() == [0, 3, 3, 4, 2, 1]


def test_hypothesis_1a_reproduces_the_published_losses(fixture_dir):
    torch.manual_seed(0)
    model = load_paren_model(fixture_dir)
    task = paren_task(fixture_dir)
    r = scrub(
        model, task, hypothesis_1a(), ScrubConfig(n_examples=4000, n_seeds=1, per_claim=False, batch_size=500)
    )
    for name, est in (("original", r.loss_original), ("random", r.loss_random), ("1a", r.loss_scrubbed)):
        mean, se = PUBLISHED[name]
        assert abs(est.mean - mean) <= 4 * se, f"{name}: {est.mean:.3f} vs published {mean} ({se})"
    assert set(r.per_class) == {"balanced", "unbalanced", "count failure", "horizon failure"}
    assert r.per_class["balanced"]["n"] + r.per_class["unbalanced"]["n"] == 4000
    # the model is near perfect on every class; scrubbing 1a hurts balanced strings most
    assert all(c["original"].mean < 0.05 for c in r.per_class.values())
    assert r.per_class["balanced"]["scrubbed"].mean > r.per_class["unbalanced"]["scrubbed"].mean
