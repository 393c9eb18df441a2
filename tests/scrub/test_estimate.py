"""The recovered fraction's interval covers resampling and the choice of references at its nominal rate, on
synthetic scrubs whose population value is known; the seeds-only interval does not when references differ."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.scrub.estimate import (
    Estimate,
    bootstrap_weights,
    recovered_fraction,
    recovered_fractions,
    seeds_interval,
    t975,
)

# a synthetic scrub: reference n has a difficulty a[n] and a cost c[n] of the hypothesis, so the references'
# own recovered fractions differ; the baseline and scrubbed runs add resampling noise (skewed, and shared
# through common random numbers as in `scrub`)
TRUE_RECOVERED = (5.0 - 1.2) / (
    5.0 - 0.2
)  # E[a] = 2, E[c] = 1: E[rand] = 2*2+1, E[scrubbed] = 1+0.2, E[orig] = 0.2


def synthetic(n: int, seeds: int, gen: torch.Generator, vary: bool) -> tuple[torch.Tensor, ...]:
    a = torch.distributions.Gamma(2.0, 1.0).sample((n,)) if vary else torch.full((n,), 2.0)
    c = torch.distributions.Gamma(1.0, 1.0).sample((n,)) if vary else torch.ones(n)
    shared = (-torch.rand(seeds, n, generator=gen).log() - 1) * 1.5  # Exp(1) - 1: mean 0, skewed
    own = torch.randn(seeds, n, generator=gen) * 0.5
    orig = 0.1 * a
    rand = 2 * a + 1 + shared
    scrubbed = c + 0.2 + 0.5 * shared + own
    return orig, rand, scrubbed


@pytest.mark.parametrize("vary", [True, False], ids=["references-vary", "resampling-only"])
def test_interval_covers_the_population_value_at_its_nominal_rate(vary):
    torch.manual_seed(0)  # the Gamma sampler draws from the global generator
    gen = torch.Generator().manual_seed(1)
    n_experiments, hits, seed_hits, widths, seed_widths = 400, 0, 0, [], []
    weights = bootstrap_weights(
        300, 1000
    )  # the data differ between experiments: one set of resamples will do
    for _ in range(n_experiments):
        orig, rand, scrubbed = synthetic(300, 5, gen, vary)
        est = recovered_fraction(orig, rand, scrubbed, weights=weights)
        hits += est.ci_low <= TRUE_RECOVERED <= est.ci_high
        seed_hits += est.seeds_low <= TRUE_RECOVERED <= est.seeds_high
        widths.append(est.ci_high - est.ci_low)
        seed_widths.append(est.seeds_high - est.seeds_low)
    coverage = hits / n_experiments
    # nominal 95%; 400 experiments give a binomial standard error of 1.1%: 3 SE either side
    assert 0.917 <= coverage <= 0.983, coverage
    if vary:  # the seeds see only the resampling: too narrow, and they miss the population value often
        assert sum(widths) / sum(seed_widths) > 2
        assert seed_hits / n_experiments < 0.7


def test_bootstrap_equals_the_loop_over_resamples():
    gen = torch.Generator().manual_seed(2)
    orig, rand, scrubbed = synthetic(7, 2, gen, vary=False)
    resamples = [torch.randint(0, 7, (7,), generator=gen) for _ in range(50)]
    weights = torch.stack([torch.bincount(idx, minlength=7).double() / 7 for idx in resamples])
    est = recovered_fraction(orig, rand, scrubbed, weights=weights)
    replicates = torch.tensor(
        [
            sum(
                (rand[s, idx].mean() - scrubbed[s, idx].mean()) / (rand[s, idx].mean() - orig[idx].mean())
                for s in range(2)
            )
            / 2
            for idx in resamples
        ],
        dtype=torch.float64,
    )
    lo, hi = torch.quantile(replicates, torch.tensor([0.025, 0.975], dtype=torch.float64))
    per_seed = (rand.mean(1) - scrubbed.mean(1)) / (rand.mean(1) - orig.mean())
    torch.testing.assert_close(
        torch.tensor([est.mean, est.se, est.ci_low, est.ci_high], dtype=torch.float64),
        torch.stack([per_seed.double().mean(), replicates.std(), lo, hi]),
    )
    torch.testing.assert_close(weights.sum(1), torch.ones(50, dtype=torch.float64))
    # several fractions on one set of resamples are each the fraction alone
    both = recovered_fractions(orig, rand, [scrubbed, rand], weights=weights)
    assert both[0] == est and (both[1].mean, both[1].ci_low, both[1].ci_high) == (0.0, 0.0, 0.0)


def test_the_empty_and_the_trivial_hypothesis_are_exact():
    gen = torch.Generator().manual_seed(3)
    orig, rand, _ = synthetic(50, 3, gen, vary=True)
    empty = recovered_fraction(orig, rand, rand.clone())
    trivial = recovered_fraction(orig, rand, orig.expand(3, 50).clone())
    assert (empty.mean, empty.ci_low, empty.ci_high) == (0.0, 0.0, 0.0)
    torch.testing.assert_close(
        torch.tensor([trivial.mean, trivial.ci_low, trivial.ci_high]), torch.ones(3), rtol=0, atol=1e-12
    )


def test_a_loss_interval_is_its_standard_error_and_the_seeds_interval_is_students_t():
    values = torch.tensor([[1.0, 2.0, 3.0, 6.0], [2.0, 2.0, 4.0, 4.0]])
    est = Estimate.of(values)
    per_example = values.double().mean(0)
    se = float(per_example.std() / 2)
    torch.testing.assert_close(
        torch.tensor([est.mean, est.se, est.ci_low, est.ci_high]),
        torch.tensor([3.0, se, 3.0 - 1.959964 * se, 3.0 + 1.959964 * se]),
    )
    per_seed = values.double().mean(1)  # 3.0 and 3.0: no spread between seeds
    assert seeds_interval(per_seed) == (3.0, 3.0) == (est.seeds_low, est.seeds_high)
    lo, hi = seeds_interval(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(
        torch.tensor([lo, hi]), torch.tensor([2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5]), atol=1e-3, rtol=0
    )
    one = Estimate.of(torch.tensor([[2.5]]))
    assert one.mean == one.ci_low == one.ci_high == 2.5 and math.isnan(one.se)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 201):
        want = float(stats.t.ppf(0.975, df))
        assert t975(df) == pytest.approx(want, abs=1e-3 if df <= 30 else 0.0, rel=0 if df <= 30 else 2e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_large_reference_sets_stream_their_resamples_to_the_same_result(monkeypatch):
    from interplab.scrub import estimate

    gen = torch.Generator().manual_seed(4)
    orig, rand, scrubbed = synthetic(500, 2, gen, vary=True)
    kept = recovered_fraction(orig, rand, scrubbed)
    monkeypatch.setattr(estimate, "CACHE_ENTRIES", 1000)  # too large to keep: streamed in chunks
    assert recovered_fraction(orig, rand, scrubbed) == kept
    assert bootstrap_weights(500, 30).shape == (30, 500)
    with pytest.raises(ValueError, match="n >= 1"):
        bootstrap_weights(0)
