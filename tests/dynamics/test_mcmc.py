"""R-hat and ESS (`interplab.dynamics.mcmc`) against ground truth: independent chains (R-hat 1, ESS = every
draw), chains that disagree (R-hat well above 1), AR(1) chains (ESS = n (1 - phi) / (1 + phi) analytically),
and the split-R-hat formula worked by hand on a small example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interplab.dynamics.mcmc import diagnose, ess, ess_bulk, ess_tail, rhat, split_rhat


def _normal(chains: int, draws: int, seed: int) -> torch.Tensor:
    return torch.randn(chains, draws, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ar1(phi: float, chains: int, draws: int, seed: int) -> np.ndarray:
    """Stationary AR(1) chains ``x_t = phi x_t-1 + e_t`` (``e ~ N(0, 1)``, started from the stationary law)."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((draws, chains))
    x = np.empty((draws, chains))
    x[0] = e[0] / math.sqrt(1 - phi**2)
    for t in range(1, draws):
        x[t] = phi * x[t - 1] + e[t]
    return x.T


@pytest.mark.parametrize("seed", range(4))
def test_independent_normal_chains_have_rhat_one_and_ess_every_draw(seed):
    """i.i.d. draws: R-hat - 1 is O(1 / draws) (here ~5e-4 SD) and the ESS is chains * draws; the ESS estimate
    of 8,000 independent draws has a relative SD of about 3% (measured over seeds), so 15% is 5 SD."""
    x = _normal(4, 2000, seed)
    d = diagnose(x)
    assert abs(d.rhat - 1) <= 0.01
    assert abs(split_rhat(x) - 1) <= 0.01
    assert 0.85 * 8000 <= d.ess_bulk <= 1.15 * 8000
    assert 0.8 * 8000 <= d.ess_tail <= 1.2 * 8000  # indicators of 5% tails carry less information: noisier
    assert d.converged and (d.chains, d.draws) == (4, 2000)


def test_chains_with_shifted_means_have_rhat_well_above_one():
    """Four chains N(k, 1), k = 0..3, split into eight halves with means 0 0 1 1 2 2 3 3: their variance (ddof
    1) is 10/7 against a within-chain variance of 1, so R-hat tends to sqrt(1 + 10/7) = 1.56."""
    x = _normal(4, 1000, 0) + torch.arange(4.0, dtype=torch.float64)[:, None]
    assert rhat(x) > 1.1 and split_rhat(x) > 1.1
    assert abs(split_rhat(x) - math.sqrt(1 + 10 / 7)) < 0.05
    assert not diagnose(x).converged
    # one chain shifted by half an SD: still caught
    y = _normal(4, 1000, 1)
    y[0] += 0.5
    assert rhat(y) > 1.01


def test_folding_catches_chains_that_differ_only_in_scale():
    """Same location, SDs 1 and 3: the bulk R-hat (and the classic one) stay near 1, the folded one does not."""
    x = _normal(4, 2000, 2) * torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64)[:, None]
    assert abs(split_rhat(x) - 1) < 0.01
    assert rhat(x) > 1.05


def test_splitting_catches_a_chain_that_drifts():
    """Every chain follows the same trend: the chains agree with each other, but each half disagrees with the
    other half of its own chain."""
    x = _normal(4, 1000, 3) + torch.linspace(0, 2, 1000, dtype=torch.float64)
    assert rhat(x) > 1.1


@pytest.mark.parametrize(("phi", "tol"), [(0.5, 0.06), (0.9, 0.15), (-0.3, 0.06)])
def test_ar1_chains_have_the_analytic_ess(phi, tol):
    """For AR(1) the autocorrelation is phi^t, tau = (1 + phi) / (1 - phi), so ESS = n (1 - phi) / (1 + phi)
    (above n for phi < 0). With 4 x 20,000 draws the ESS estimate's relative SD, measured over 10 seeds, is
    about 1.3% at phi = 0.5, 1.1% at phi = -0.3 and 5% at phi = 0.9 (longer correlations, fewer effective
    draws): the tolerances are 3-5 SD. The ranks barely change a Gaussian chain, so bulk ESS = the ESS too."""
    x = _ar1(phi, 4, 20_000, seed=11)
    expected = x.size * (1 - phi) / (1 + phi)
    assert abs(ess(x) / expected - 1) <= tol
    assert abs(ess_bulk(x) / expected - 1) <= tol
    assert abs(rhat(x) - 1) <= 0.01


def test_correlated_chains_have_fewer_tail_draws_than_independent_ones():
    x = _ar1(0.9, 4, 5000, seed=5)
    assert ess_tail(x) < 0.2 * x.size and ess_tail(_normal(4, 5000, 5)) > 0.8 * x.size


def _hand_rhat(chains: list[list[float]]) -> float:
    """The split-chain R-hat formula for chains that are already split, with M chains of N draws:
    W = mean_j s_j^2 (s_j^2 with N - 1), B = N / (M - 1) sum_j (mean_j - mean)^2,
    var_plus = (N - 1) / N * W + B / N, R-hat = sqrt(var_plus / W)."""
    M, N = len(chains), len(chains[0])
    means = [sum(c) / N for c in chains]
    grand = sum(means) / M
    W = sum(sum((v - m) ** 2 for v in c) / (N - 1) for c, m in zip(chains, means, strict=True)) / M
    B = N / (M - 1) * sum((m - grand) ** 2 for m in means)
    return math.sqrt(((N - 1) / N * W + B / N) / W)


def test_split_rhat_matches_the_formula_worked_by_hand():
    """Chains [1 3 2 6] and [4 5 8 7] split into [1 3] [2 6] [4 5] [8 7] (M = 4, N = 2): means 2, 4, 4.5, 7.5
    (grand mean 4.5), variances 2, 8, 0.5, 0.5 so W = 11/4; B = 2/3 (2.5^2 + 0.5^2 + 0 + 3^2) = 31/3, B/N =
    31/6; var_plus = 1/2 * 11/4 + 31/6 = 157/24 and R-hat = sqrt((157/24) / (11/4)) = sqrt(157/66) = 1.5423."""
    x = torch.tensor([[1.0, 3, 2, 6], [4, 5, 8, 7]])
    assert split_rhat(x) == pytest.approx(math.sqrt(157 / 66), rel=1e-12)
    assert _hand_rhat([[1, 3], [2, 6], [4, 5], [8, 7]]) == pytest.approx(math.sqrt(157 / 66), rel=1e-12)

    # rank-normalised: the 8 values are their own ranks; z = Phi^-1((r - 3/8) / (8 + 1/4))
    def z(r: float) -> float:
        return float(torch.special.ndtri(torch.tensor((r - 3 / 8) / 8.25, dtype=torch.float64)))

    bulk = _hand_rhat([[z(1), z(3)], [z(2), z(6)], [z(4), z(5)], [z(8), z(7)]])
    # folded: |x - 4.5| = 3.5 1.5 | 2.5 1.5 | 0.5 0.5 | 3.5 2.5, ties ranked by their average:
    # 0.5 -> 1.5, 1.5 -> 3.5, 2.5 -> 5.5, 3.5 -> 7.5
    folded = _hand_rhat([[z(7.5), z(3.5)], [z(5.5), z(3.5)], [z(1.5), z(1.5)], [z(7.5), z(5.5)]])
    assert rhat(x) == pytest.approx(max(bulk, folded), rel=1e-12)
    assert bulk > folded  # here the locations differ, the scales hardly


def test_an_odd_draw_count_drops_the_middle_draw():
    x = torch.tensor([[1.0, 3, 100, 2, 6], [4, 5, -100, 8, 7]])
    assert split_rhat(x) == pytest.approx(math.sqrt(157 / 66), rel=1e-12)


def test_constant_chains():
    """All draws equal: nothing to compare (R-hat NaN), every draw counts; chains stuck at different values:
    R-hat infinite."""
    same = torch.ones(3, 10)
    assert math.isnan(rhat(same)) and ess(same) == 30.0
    stuck = torch.arange(3.0)[:, None].expand(3, 10)
    assert rhat(stuck) == math.inf


def test_numpy_and_tensor_inputs_agree():
    x = _normal(3, 50, 4)
    assert diagnose(x) == diagnose(x.numpy())


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(100), r"must be a \[chains, draws\] array, got shape \(100,\)"),
        (torch.randn(1, 100), r"has 1 chain\(s\): R-hat and ESS need >= 2 chains of >= 4 draws"),
        (torch.randn(4, 3), r"has 3 draws per chain: split chains need >= 4 draws"),
        (
            torch.tensor([[0.0, 1, 2, 3], [0, float("nan"), 2, 3]]),
            r"1 NaN/inf values \(first nan at chain 1, draw 1\)",
        ),
    ],
    ids=["1d", "one-chain", "three-draws", "nan"],
)
def test_bad_inputs_are_refused_with_the_reason(x, match):
    for fn in (rhat, ess_bulk, ess_tail, split_rhat, ess, diagnose):
        with pytest.raises(ValueError, match=match):
            fn(x)
