"""Estimates of causal scrubbing: losses and the recovered fraction, with intervals that cover both sources of
chance in a scrub, resampling (which agreeing and random inputs were drawn: the seeds) and dataset sampling
(which reference examples were drawn).

Why one bootstrap over references covers both. A scrub computes, for each reference example ``n`` and seed
``s``, the original loss ``o[n]``, the random-baseline loss ``r[s, n]`` and the scrubbed loss ``c[s, n]``.
Every input a reference's treeified model runs on is drawn for that reference alone, so given the data set
the per-reference records ``(o[n], r[:, n], c[:, n])`` are independent and identically distributed: the
variance of a per-reference seed average is (variation between references) + (resampling variation) / S,
exactly the two parts of the variance of the estimate. Resampling whole records (all seeds of a reference
together, which also keeps the common random numbers shared by a reference's baseline and scrubbed runs
paired) therefore estimates the total, and a percentile interval of the bootstrap replicates covers the
population value (the one an unlimited number of references and seeds would give) at its nominal rate; the
between-seed spread alone (references fixed) only sees the resampling part and is too narrow whenever
references differ (`Estimate.seeds_low`, kept for comparison). The data set counts as a sample of the
task's distribution, so the interval does not shrink to the seeds' when every row is a reference.

>>> o = torch.zeros(400); r = 4 + torch.randn(3, 400); c = 1 + torch.randn(3, 400)
>>> est = recovered_fraction(o, r, c)
>>> est.ci_low < est.mean < est.ci_high
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

N_BOOT = 2000
"""bootstrap replicates of the recovered fraction (its interval's 2.5% and 97.5% points are stable to ~0.1%)"""
BOOT_SEED = 0
"""the bootstrap's generator seed: a report is reproducible"""
_Z = 1.959963984540054  # the 97.5% point of the standard normal
# the 97.5% points of Student's t with 1..30 degrees of freedom (two-sided 95% intervals over seeds)
_T975: tuple[float, ...] = (
    (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
    + (2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)
    + (2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
)


def t975(df: int) -> float:
    """The 97.5% point of Student's t with ``df`` degrees of freedom (the normal's beyond 30, within 2%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else _Z + 2.4 / df  # 2.4/df: t's excess over the normal


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error and a 95% interval that cover resampling and the choice of references,
    and a 95% interval over resampling seeds alone (the references fixed)."""

    mean: float
    se: float
    """standard error over reference examples (per-example values averaged over seeds first); it covers
    resampling too (see the module docstring). NaN with one example."""
    ci_low: float
    ci_high: float
    """95% interval covering both resampling and the choice of references: mean +- 1.96 se for a loss, the
    bootstrap percentile interval for the recovered fraction (see `recovered_fraction`)"""
    seeds_low: float = math.nan
    seeds_high: float = math.nan
    """95% interval over resampling seeds alone, the references fixed (Student's t, seeds - 1 degrees of
    freedom; the mean itself with one seed): too narrow for the population value when references vary"""

    @classmethod
    def of(cls, values: Float[Tensor, "seeds examples"]) -> Estimate:
        """A loss: ``values`` [seeds examples] (one row for the unscrubbed loss)."""
        values = values.detach().double()
        mean = float(values.mean())
        per_example = values.mean(0)
        n = per_example.numel()
        se = float(per_example.std() / math.sqrt(n)) if n > 1 else math.nan
        lo, hi = seeds_interval(values.mean(1))
        if n > 1:
            return cls(mean, se, mean - _Z * se, mean + _Z * se, lo, hi)
        return cls(mean, se, lo, hi, lo, hi)

    def __format__(self, spec: str) -> str:
        return f"{self.mean:{spec or '.3f'}} ({self.se:{spec or '.3f'}})"


def seeds_interval(per_seed: Float[Tensor, " seeds"]) -> tuple[float, float]:
    """The 95% t interval of the mean of ``per_seed`` (the mean itself with one seed)."""
    per_seed = per_seed.detach().double()
    mean, s = float(per_seed.mean()), per_seed.numel()
    half = t975(s - 1) * float(per_seed.std()) / math.sqrt(s) if s > 1 else 0.0
    return mean - half, mean + half


def bootstrap_weights(n: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Float[Tensor, "n_boot n"]:
    """``n_boot`` bootstrap resamples of ``n`` references, as the fraction of the resample each reference
    makes up (rows sum to 1): ``weights @ per_reference`` gives the replicates' means. Deterministic in
    ``seed``; the last ones computed are kept (read-only) while they take at most 128 MB."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_weights needs n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    if n * n_boot <= CACHE_ENTRIES:
        return _cached_weights(n, n_boot, seed)
    return torch.cat(list(_weight_chunks(n, n_boot, seed)))


CACHE_ENTRIES = 2**24
"""bootstrap weights of at most this many entries (float64: 128 MB) are kept for the next call: the rows of
a scrub (one per claim) share them; larger ones are streamed"""


@functools.lru_cache(maxsize=1)
def _cached_weights(n: int, n_boot: int, seed: int) -> Tensor:
    return torch.cat(list(_weight_chunks(n, n_boot, seed)))


def _weight_chunks(n: int, n_boot: int, seed: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, 2**22 // n)  # ~4M indices at a time, whatever n
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = torch.randint(0, n, (rows, n), generator=gen)
        counts = torch.zeros(rows, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(rows, n, dtype=torch.float64)
        )
        yield counts / n


def _replicate_means(table: Tensor, weights: Tensor | None) -> Tensor:
    """``weights @ table`` for the given weights, else for the default ones (streamed when too large to keep)."""
    if weights is not None:
        return weights.double() @ table
    n = table.shape[0]
    if n * N_BOOT <= CACHE_ENTRIES:
        return bootstrap_weights(n) @ table
    return torch.cat([w @ table for w in _weight_chunks(n, N_BOOT, BOOT_SEED)])


def recovered_fraction(
    orig: Float[Tensor, " examples"],
    rand: Float[Tensor, "seeds examples"],
    scrubbed: Float[Tensor, "seeds examples"],
    *,
    weights: Tensor | None = None,
) -> Estimate:
    """The fraction of loss recovered, ``(L_random - L_scrubbed) / (L_random - L_original)`` averaged over
    seeds, with a 95% bootstrap percentile interval over references (whole records: every seed of a
    reference together) that covers resampling and the choice of references (see the module docstring).

    ``se`` is the bootstrap replicates' standard deviation; ``seeds_low``/``seeds_high`` the t interval over
    the per-seed fractions alone. ``weights`` (`bootstrap_weights`) lets several fractions over the same
    references share one set of resamples, as a scrub's per-claim rows do."""
    return recovered_fractions(orig, rand, [scrubbed], weights=weights)[0]


def recovered_fractions(
    orig: Float[Tensor, " examples"],
    rand: Float[Tensor, "seeds examples"],
    scrubbed: Sequence[Tensor] | Tensor,
    *,
    weights: Tensor | None = None,
) -> list[Estimate]:
    """`recovered_fraction` for each ``scrubbed[i]`` [seeds examples], on one shared set of resamples."""
    orig = orig.detach().double().reshape(-1)
    rand = rand.detach().double()
    n_seeds, n = rand.shape
    variants = [torch.as_tensor(v).detach().double() for v in scrubbed]
    for v in variants:
        if v.shape != rand.shape or orig.numel() != n:
            raise ValueError(
                f"recovered_fraction: orig [{orig.numel()}], rand {tuple(rand.shape)} and scrubbed "
                f"{tuple(v.shape)} must be [examples], [seeds examples], [seeds examples]"
            )
    if weights is not None and weights.shape[1] != n:
        raise ValueError(f"bootstrap weights are for {weights.shape[1]} references, the losses for {n}")
    # columns: orig, rand per seed, then each variant per seed; one product gives every replicate's means
    table = torch.cat([orig[:, None], rand.T, *[v.T for v in variants]], 1)
    means = table.mean(0)
    boot = _replicate_means(table, weights)  # [n_boot, columns]
    o, r = 0, slice(1, 1 + n_seeds)
    out = []
    for i in range(len(variants)):
        c = slice(1 + n_seeds * (i + 1), 1 + n_seeds * (i + 2))
        per_seed = (means[r] - means[c]) / (means[r] - means[o])
        replicates = ((boot[:, r] - boot[:, c]) / (boot[:, r] - boot[:, o : o + 1])).mean(1)
        mean = float(per_seed.mean())
        lo_s, hi_s = seeds_interval(per_seed)
        if n > 1 and bool(torch.isfinite(replicates).all()):
            lo, hi = torch.quantile(replicates, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
            se = float(replicates.std())
        else:  # one reference, or a baseline no worse than the original in some resample
            lo, hi, se = math.nan, math.nan, math.nan
        out.append(Estimate(mean, se, lo, hi, lo_s, hi_s))
    return out
