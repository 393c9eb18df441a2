"""The chains' convergence diagnostics carried by an LLC estimate: R-hat and ESS of its draws, the warning when
they have not mixed, and the fields through to_dict / from_dict / plot (old files included)."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from interplab.dynamics import (
    LLCConvergenceWarning,
    LLCEstimate,
    SGLDConfig,
    ess_bulk,
    ess_tail,
    estimate_llc,
    mse_loss,
    rhat,
    susceptibility,
)
from tests.dynamics.test_llc import _linear

# d = 2 regression, nbeta = 145: each SGLD step contracts w - w* by 1 - eps / 2 (nbeta + gamma) = 0.85, so the
# loss decorrelates in a few steps and 4 x 1000 draws mix (measured R-hat 1.003, ESS bulk 789)
MIXING = SGLDConfig(step_size=2e-3, gamma=1.0, chains=4, draws=1000, burn_in=100, batch_size=None)
# a step 2,000x smaller and no burn-in: the chains only creep away from w* in 40 steps (R-hat 1.83)
CREEPING = SGLDConfig(step_size=1e-6, gamma=1.0, chains=4, draws=40, burn_in=0, batch_size=None)


def test_a_mixing_estimate_carries_finite_diagnostics_and_does_not_warn():
    model, data = _linear(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLCConvergenceWarning)
        est = estimate_llc(model, data, mse_loss, MIXING)
    assert math.isfinite(est.rhat) and math.isfinite(est.ess_bulk) and math.isfinite(est.ess_tail)
    assert 1 - 0.01 < est.rhat < 1.01 and est.converged
    assert 0 < est.ess_bulk <= 4000 * math.log10(4000) and 0 < est.ess_tail
    # the diagnostics of the draws' losses after the burn-in, computed by mcmc
    draws = est.trace[:, MIXING.burn_in :]
    assert (est.rhat, est.ess_bulk, est.ess_tail) == (rhat(draws), ess_bulk(draws), ess_tail(draws))
    # which are those of the per-draw LLC, nbeta (L_t - L(w*)) (an increasing affine map of the loss: the ranks
    # are the same; the folded R-hat's |x - median| rounds differently after the scaling, 1.4e-6 apart here)
    per_draw = est.nbeta * (draws.double() - est.init_loss)
    assert est.rhat == pytest.approx(rhat(per_draw), rel=1e-5)
    assert est.ess_bulk == pytest.approx(ess_bulk(per_draw), rel=1e-6)
    assert est.ess_tail == pytest.approx(ess_tail(per_draw), rel=1e-6)
    assert "R-hat 1.00" in est.summary() and "mixed" in est.summary() and "NOT" not in est.summary()
    assert "rhat=" in repr(est)


def test_a_too_short_run_with_a_tiny_step_warns_with_the_fix():
    model, data = _linear(2)
    with pytest.warns(LLCConvergenceWarning, match=r"R-hat 1\.\d+ > 1\.01") as caught:
        est = estimate_llc(model, data, mse_loss, CREEPING)
    message = str(caught[0].message)
    assert "burn_in (try 100)" in message and "draws (try 160)" in message and "step_size 1e-05" in message
    assert est.rhat > 1.1 and not est.converged and "NOT mixed" in est.summary()
    assert math.isfinite(est.llc)  # a warning, not an error: the estimate is still there to look at


def test_chains_that_disagree_are_told_the_step_size_or_more_draws():
    """The existing analytic config of the full-rank regression, cut to 200 draws: the chains wander (ESS
    ~ 30), no common trend; the advice names more draws and the step size."""
    model, data = _linear(4)
    cfg = SGLDConfig(step_size=2e-4, gamma=1.0, chains=8, draws=200, burn_in=300, batch_size=None)
    with pytest.warns(
        LLCConvergenceWarning, match=r"more draws \(try 800\).*smaller step_size \(try 2e-05\)"
    ):
        estimate_llc(model, data, mse_loss, cfg)


def test_one_chain_or_few_draws_have_no_diagnostics_and_no_warning():
    model, data = _linear(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLCConvergenceWarning)
        one = estimate_llc(model, data, mse_loss, SGLDConfig(**{**vars(CREEPING), "chains": 1}))
        few = estimate_llc(model, data, mse_loss, SGLDConfig(**{**vars(CREEPING), "draws": 3}))
    for est in (one, few):
        assert math.isnan(est.rhat) and math.isnan(est.ess_bulk) and "R-hat n/a" in est.summary()
        assert est.to_dict()["rhat"] is None


def test_the_diagnostics_survive_json_and_old_files_are_recomputed_from_their_trace():
    model, data = _linear(2)
    est = estimate_llc(model, data, mse_loss, MIXING)
    back = LLCEstimate.from_dict(json.loads(json.dumps(est.to_dict())))
    assert (back.rhat, back.ess_bulk, back.ess_tail) == (est.rhat, est.ess_bulk, est.ess_tail)
    old = {k: v for k, v in est.to_dict().items() if k not in ("rhat", "ess_bulk", "ess_tail")}
    recomputed = LLCEstimate.from_dict(old)  # a file written before the diagnostics existed
    assert recomputed.rhat == pytest.approx(est.rhat, rel=1e-9)
    assert recomputed.ess_bulk == pytest.approx(est.ess_bulk, rel=1e-9)
    bare = LLCEstimate.from_dict({k: v for k, v in old.items() if k != "trace"})
    assert math.isnan(bare.rhat) and bare.llc == est.llc


def test_the_trace_plot_shows_the_diagnostics():
    model, data = _linear(2)
    good = estimate_llc(model, data, mse_loss, MIXING)
    with pytest.warns(LLCConvergenceWarning):
        bad = estimate_llc(model, data, mse_loss, CREEPING)
    title = good.plot().layout.title
    assert (
        f"R-hat {good.rhat:.3f}" in title.text and "ESS bulk" in title.text and "not mixed" not in title.text
    )
    bad_title = bad.plot().layout.title
    assert "not mixed" in bad_title.text and bad_title.font.color == "firebrick"


def test_a_susceptibility_carries_its_chains_diagnostics():
    model, data = _linear(2)
    chi = susceptibility(model, data, data, mse_loss, MIXING)
    assert math.isfinite(chi.llc.rhat) and chi.to_dict()["llc"]["rhat"] == chi.llc.rhat


def test_the_default_threshold_is_checked_not_the_value():
    """R-hat between 1.005 and 1.01 is fine, above is not: `converged` follows the documented threshold."""
    model, data = _linear(2)
    est = estimate_llc(model, data, mse_loss, MIXING)
    assert LLCEstimate(**{**vars(est), "rhat": 1.009}).converged
    assert not LLCEstimate(**{**vars(est), "rhat": 1.011}).converged
    assert not LLCEstimate(**{**vars(est), "rhat": math.inf}).converged
