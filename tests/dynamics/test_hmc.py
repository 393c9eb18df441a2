"""The exact (Metropolis-corrected) HMC reference sampler against ground truth: for linear regression with the
squared loss the tempered, localised posterior is exactly Gaussian, so the estimator's target
``E[nbeta (L_n(w) - L_n(w0))]`` has a closed form at any nbeta and gamma, at the minimum or away from it; the
sampler must match it within its SE (in both directions, with an SE small enough to matter), and, unlike
SGLD, give the same value at two step sizes. Seeds are fixed, so each check is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from interplab.dynamics import (
    Component,
    HMCConfig,
    LowAcceptanceWarning,
    SGLDConfig,
    estimate_llc,
    estimate_llc_hmc,
    mse_loss,
)
from tests.dynamics.test_llc import GAMMA, _linear, validation_case

NBETA = 1000 / math.log(1000)


def gaussian_llc(
    x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, nbeta: float, gamma: float, sampled: list[int]
) -> float:
    """``E[nbeta (L(w) - L(w0))]`` under ``exp(-nbeta L(w) - gamma / 2 |w - w0|^2)`` for ``L(w) = 1/2
    mean (y - x w)^2``, only the entries ``sampled`` of ``w`` moving: with the Hessian ``H`` and gradient ``g``
    of L at w0 on those entries, ``L(w) - L(w0) = g.d + d H d / 2`` exactly, the posterior of ``d`` is
    ``N(mu, P^-1)`` with ``P = nbeta H + gamma I`` and ``mu = -nbeta P^-1 g``, so the expectation is
    ``nbeta (g.mu + mu H mu / 2 + tr(H P^-1) / 2)``."""
    x, y, w0 = x.double(), y.double()[:, 0], w0.double()
    n = x.shape[0]
    h_full = x.T @ x / n
    g_full = -x.T @ (y - x @ w0) / n
    idx = torch.tensor(sampled)
    h, g = h_full[idx][:, idx], g_full[idx]
    p = nbeta * h + gamma * torch.eye(len(sampled), dtype=torch.float64)
    mu = -nbeta * torch.linalg.solve(p, g)
    return float(nbeta * (g @ mu + mu @ h @ mu / 2 + torch.trace(h @ torch.linalg.inv(p)) / 2))


def _within(est, exact: float, max_se: float) -> None:
    assert abs(est.llc - exact) < 3 * est.se, f"HMC {est.llc:.4f} ± {est.se:.4f}, exact {exact:.4f}"
    assert est.se < max_se, f"SE {est.se:.4f}: too large for the check to mean anything"


CFG = HMCConfig(step_size=0.05, leapfrog_steps=1, gamma=GAMMA, chains=64, draws=400, burn_in=100, seed=1)


@pytest.mark.parametrize("where", ["minimum", "off-minimum", "component"])
def test_matches_the_gaussian_closed_form(where):
    """At the least-squares minimum (the regular model's 1/2 sum nbeta h / (nbeta h + gamma) = 1.986), 0.1
    away from it in every weight (a checkpoint that is not a minimum: the posterior's mean moves, the target is
    negative), and for a component (3 of the 4 weights sampled, the 4th frozen)."""
    model, (x, y) = _linear(4)
    sampled = [0, 1, 2, 3]
    component = None
    if where == "off-minimum":
        with torch.no_grad():
            model.weight.add_(0.1)
    if where == "component":
        sampled = [0, 1, 3]
        component = Component("three", {"weight": torch.tensor([[True, True, False, True]])})
    w0 = model.weight.detach()[0]
    exact = gaussian_llc(x, y, w0, NBETA, GAMMA, sampled)
    est = estimate_llc_hmc(model, (x, y), mse_loss, CFG, component=component)
    _within(est, exact, max_se=0.04)  # 2% of d / 2
    assert est.n_params == len(sampled) and est.trace.shape == (64, 500)
    assert abs(est.acceptance - CFG.target_accept) < 0.1, est.acceptance  # the adaptation reached its target
    assert est.converged, est.summary()  # R-hat of the loss and of |w - w*|^2 below 1.01
    torch.testing.assert_close(model.weight.detach()[0], w0, rtol=0, atol=0)  # the model is untouched
    if where == "minimum":
        assert abs(exact - 1.986) < 1e-3
    if where == "off-minimum":
        assert exact < -0.5  # the chains fall towards the minimum: far from d / 2, a real test of the drift


def quartic_llc(x: torch.Tensor, nbeta: float, gamma: float) -> float:
    """The exact target of test_llc's planted degenerate direction (``y = w . x[:3] + v^2 x[3]`` at its
    truth ``v = 0``, noise orthogonal to x): ``L - L(w*) = z H z / 2`` with ``z = (dw, v^2)``, so given ``v``
    the posterior of ``dw`` is Gaussian (precision ``P = nbeta H[:3, :3] + gamma I``, mean ``-nbeta v^2 P^-1
    H[:3, 3]``) and what is left is a 1-D integral over ``v`` with weight ``exp(-kappa v^4 / 2 - gamma v^2 /
    2)``, done by quadrature on a fine grid. Not Gaussian: it tends to 3/2 + 1/4 only as nbeta grows."""
    x = x.double()
    h = x.T @ x / x.shape[0]
    a, b, c = h[:3, :3], h[:3, 3], h[3, 3]
    p_inv = torch.linalg.inv(nbeta * a + gamma * torch.eye(3, dtype=torch.float64))
    kappa = nbeta * c - nbeta**2 * b @ p_inv @ b
    v = torch.linspace(-6, 6, 200001, dtype=torch.float64) * (nbeta * c) ** -0.25
    s = v**2
    m = -nbeta * s[:, None] * (p_inv @ b)[None]  # [grid 3]: E[dw | v]
    given_v = nbeta / 2 * (torch.trace(a @ p_inv) + ((m @ a) * m).sum(1) + 2 * s * (m @ b) + c * s**2)
    log_w = -kappa * v**4 / 2 - gamma * v**2 / 2
    weight = (log_w - log_w.max()).exp()
    return float((given_v * weight).sum() / weight.sum())


def test_matches_the_exact_quartic_target_of_a_degenerate_direction():
    """A singular, non-Gaussian posterior with an exact answer: 1.730 at nbeta = 145 (the quadrature gives
    1.7499 at nbeta = 1e6, where the learning coefficient 1.75 is the limit)."""
    model, data, _ = validation_case("planted")
    exact = quartic_llc(data[0], NBETA, GAMMA)
    assert abs(quartic_llc(data[0], 1e6, GAMMA) - 1.75) < 2e-3 and abs(exact - 1.730) < 1e-3
    est = estimate_llc_hmc(model, data, mse_loss, HMCConfig(**{**vars(CFG), "draws": 600, "seed": 0}))
    _within(est, exact, max_se=0.02)
    assert est.converged, est.summary()  # R-hat of the loss and of |w - w*|^2 below 1.01


def test_no_step_bias_where_sgld_has_one():
    """The same Langevin proposal with and without the Metropolis correction: SGLD (full batch) at steps 1e-3
    and 4e-3 differs by many SEs (its stationary variance in a direction of curvature k is inflated by
    1 / (1 - step k / 4)), MALA (one leapfrog step of h = sqrt(step), the step fixed) gives the exact value
    at both."""
    model, (x, y) = _linear(4)
    exact = gaussian_llc(x, y, model.weight.detach()[0], NBETA, GAMMA, [0, 1, 2, 3])
    sgld, mala = [], []
    for step in (1e-3, 4e-3):
        cfg = SGLDConfig(step_size=step, gamma=GAMMA, chains=64, draws=500, burn_in=100, batch_size=None)
        sgld.append(estimate_llc(model, (x, y), mse_loss, cfg))
        hmc = HMCConfig(
            step_size=math.sqrt(step),
            leapfrog_steps=1,
            adapt=False,
            gamma=GAMMA,
            chains=64,
            draws=500,
            burn_in=100,
        )
        mala.append(estimate_llc_hmc(model, (x, y), mse_loss, hmc))
    se = math.hypot(sgld[0].se, sgld[1].se)
    assert sgld[1].llc - sgld[0].llc > 5 * se, [
        (e.llc, e.se) for e in sgld
    ]  # SGLD's bias grows with the step
    assert sgld[1].llc - exact > 5 * sgld[1].se
    for est in mala:
        _within(est, exact, max_se=0.04)
    assert abs(mala[1].llc - mala[0].llc) < 3 * math.hypot(mala[0].se, mala[1].se)
    assert mala[1].acceptance < mala[0].acceptance < 1  # the correction rejects more at the larger step


def test_deterministic_for_a_seed_and_per_chain_calls_equal_vmap():
    model, data = _linear(3)
    cfg = HMCConfig(step_size=0.05, leapfrog_steps=2, gamma=10.0, chains=3, draws=20, burn_in=10, seed=7)
    one = estimate_llc_hmc(model, data, mse_loss, cfg)
    two = estimate_llc_hmc(model, data, mse_loss, cfg)
    torch.testing.assert_close(one.trace, two.trace, rtol=0, atol=0)
    assert one.llc == two.llc and one.step_size == two.step_size
    other = estimate_llc_hmc(model, data, mse_loss, HMCConfig(**{**vars(cfg), "seed": 8}))
    assert not torch.equal(one.trace, other.trace)
    looped = estimate_llc_hmc(model, data, mse_loss, cfg, vectorize=False)
    torch.testing.assert_close(looped.trace, one.trace, rtol=1e-10, atol=1e-12)
    assert "acceptance" in one.summary() and one.to_dict(trace=False)["sampler"] == "hmc"


def test_low_acceptance_warns_with_the_fix():
    model, data = _linear(4)
    cfg = HMCConfig(step_size=1.0, leapfrog_steps=1, adapt=False, gamma=GAMMA, chains=4, draws=20, burn_in=0)
    with pytest.warns(LowAcceptanceWarning, match=r"smaller step_size \(try 0\.25\) or adapt=True"):
        est = estimate_llc_hmc(model, data, mse_loss, cfg)
    assert est.acceptance < 0.3
    torch.testing.assert_close(est.trace, torch.full_like(est.trace, est.init_loss))  # nothing accepted


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="step_size must be a finite number > 0, got -1"):
        HMCConfig(step_size=-1)
    with pytest.raises(ValueError, match="leapfrog_steps must be an integer >= 1, got 0"):
        HMCConfig(leapfrog_steps=0)
    with pytest.raises(ValueError, match=r"target_accept must be in \(0, 1\), got 1.5"):
        HMCConfig(target_accept=1.5)
    with pytest.raises(ValueError, match="needs burn_in >= 1.*or adapt=False"):
        HMCConfig(burn_in=0)
    with pytest.raises(ValueError, match=r"jitter must be in \[0, 1\), got 1"):
        HMCConfig(jitter=1)
    model, (x, y) = _linear(2)
    with pytest.raises(ValueError, match="loss at the model's weights w\\* is nan"):
        estimate_llc_hmc(model, (x, y * math.nan), mse_loss, HMCConfig(burn_in=5, draws=5))
    with pytest.raises(ValueError, match="component names parameters the model lacks"):
        estimate_llc_hmc(model, (x, y), mse_loss, component=Component("bad", {"bias": None}))


def test_an_interplab_transformer_and_one_head_sample_per_chain():
    """The per-chain path (the default for an interplab `Transformer`) in float64, the whole model and one head:
    deterministic for a seed, proposals accepted, the model's own weights untouched."""
    import warnings

    from interplab.dynamics import head_component, lm_loss
    from interplab.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8, attn_only=True))
    tokens = torch.randint(0, 20, (12, 8), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = HMCConfig(step_size=0.01, leapfrog_steps=2, chains=2, draws=8, burn_in=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # too few draws to have mixed
        whole = estimate_llc_hmc(model, (tokens,), lm_loss, cfg)
        again = estimate_llc_hmc(model, (tokens,), lm_loss, cfg)
        head = estimate_llc_hmc(model, (tokens,), lm_loss, cfg, component=head_component(model, 0, 1))
    assert torch.equal(whole.trace, again.trace) and torch.isfinite(whole.trace).all()
    assert whole.acceptance > 0 and head.acceptance > 0
    assert head.n_params < whole.n_params and head.component == "L0H1"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
