"""Convergence diagnostics of MCMC chains: rank-normalised split-R-hat and bulk / tail effective sample size
(Vehtari, Gelman, Simpson, Carpenter & Buerkner 2021, "Rank-normalization, folding, and localization: an
improved R-hat for assessing convergence of MCMC"), from a ``[chains, draws]`` array of one scalar per draw
(the SGLD loss or per-draw LLC of `interplab.dynamics.estimate_llc`).

With ``M`` chains of ``N`` draws after splitting every chain in half (so a chain that drifts disagrees with
itself), chain means ``m_j``, within-chain variances ``s_j^2`` (``ddof = 1``) and their mean ``W``::

    B / N    = var_j(m_j)                      (ddof = 1: between-chain variance of the means)
    var_plus = (N - 1) / N * W + B / N
    R-hat    = sqrt(var_plus / W)

computed on normal scores ``z = Phi^-1((rank - 3/8) / (S + 1/4))`` of all ``S`` pooled draws (bulk), and on
the normal scores of ``|x - median(x)|`` (tails: chains with equal location but different scale); `rhat` is the
larger. 1 means the chains agree; the paper's threshold for trusting an estimate is ``R-hat < 1.01``
(`RHAT_THRESHOLD`) with bulk and tail ESS above 100 per chain.

The effective sample size is ``M N / tau`` with the integrated autocorrelation time
``tau = -1 + 2 sum_t rho_t``, the autocorrelations combined over chains as
``rho_t = 1 - (W - mean_j acov_j(t)) / var_plus`` and summed by Geyer's initial monotone sequence (pairs
``rho_2k + rho_2k+1`` summed until the first negative pair, made non-increasing). `ess_bulk` is the ESS of the
rank-normalised split chains, `ess_tail` the smaller ESS of the indicators ``x <= q_0.05`` and ``x <= q_0.95``.

>>> import torch
>>> x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
>>> d = diagnose(x)
>>> abs(d.rhat - 1) < 0.01 and 3000 < d.ess_bulk < 5000
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

RHAT_THRESHOLD = 1.01
"""R-hat above this: the chains have not mixed (Vehtari et al. 2021, section 4: trust R-hat < 1.01)"""
ESS_PER_CHAIN = 100
"""bulk and tail ESS below this many per chain: too few effective draws for a reliable R-hat or SE"""
MIN_CHAINS = 2
MIN_DRAWS = 4


@dataclass(frozen=True)
class ChainDiagnostics:
    """R-hat and effective sample sizes of one scalar over ``chains`` chains of ``draws`` draws."""

    rhat: float
    """rank-normalised split-R-hat: the larger of the bulk and the folded (tail) one"""
    ess_bulk: float
    """effective sample size of the rank-normalised split chains (the location: means, medians)"""
    ess_tail: float
    """the smaller effective sample size of the 5% and 95% quantile indicators (the tails, intervals)"""
    chains: int
    draws: int

    @property
    def converged(self) -> bool:
        """R-hat below `RHAT_THRESHOLD` and both ESSs at least `ESS_PER_CHAIN` per chain."""
        return self.rhat < RHAT_THRESHOLD and min(self.ess_bulk, self.ess_tail) >= ESS_PER_CHAIN * self.chains

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_draws(x: Tensor | np.ndarray | Any, what: str = "draws") -> Tensor:
    """``x`` as a float64 ``[chains, draws]`` tensor, refused with the reason when it cannot be diagnosed."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu().double()
    if t.dim() != 2:
        raise ValueError(f"{what} must be a [chains, draws] array, got shape {tuple(t.shape)}")
    chains, draws = t.shape
    if chains < MIN_CHAINS:
        raise ValueError(
            f"{what} has {chains} chain(s): R-hat and ESS need >= {MIN_CHAINS} chains of >= {MIN_DRAWS} draws "
            f"(shape [chains, draws], got {tuple(t.shape)})"
        )
    if draws < MIN_DRAWS:
        raise ValueError(
            f"{what} has {draws} draws per chain: split chains need >= {MIN_DRAWS} draws "
            f"(shape [chains, draws], got {tuple(t.shape)})"
        )
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        c, d = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{what} holds {int(bad.sum())} NaN/inf values (first {float(t[c, d])} at chain {c}, draw {d}): "
            "diagnostics need finite draws"
        )
    return t


def split_chains(x: Tensor) -> Tensor:
    """``[chains, draws]`` -> ``[2 chains, draws // 2]``: the first and the last half of every chain (the
    middle draw of an odd count is dropped)."""
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, x.shape[1] - half :]])


def normal_scores(x: Tensor) -> Tensor:
    """``Phi^-1((rank - 3/8) / (S + 1/4))`` of every entry among all ``S`` entries, ties given their average
    rank (Blom's rank-normalisation, as in Vehtari et al. 2021)."""
    flat = x.reshape(-1)
    values, order = torch.sort(flat)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # 1-based rank of each tie group's last member
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(flat)
    ranks[order] = torch.repeat_interleave(avg, counts)
    s = flat.numel()
    return torch.special.ndtri((ranks - 3 / 8) / (s + 1 / 4)).reshape(x.shape)


def _rhat(x: Tensor) -> float:
    """The R-hat formula of the module docstring on ``[chains, draws]`` as given (no split, no ranks)."""
    n = x.shape[1]
    w = float(x.var(1, unbiased=True).mean())
    b_over_n = float(x.mean(1).var(unbiased=True))
    if w == 0:
        return math.nan if b_over_n == 0 else math.inf
    return math.sqrt(((n - 1) / n * w + b_over_n) / w)


def split_rhat(x: Tensor | np.ndarray) -> float:
    """The classic split-R-hat (Gelman et al., BDA3) of the raw values: no rank-normalisation."""
    return _rhat(split_chains(_as_draws(x)))


def rhat(x: Tensor | np.ndarray) -> float:
    """Rank-normalised split-R-hat: the larger of the bulk R-hat (normal scores of the split chains) and the
    folded one (normal scores of ``|x - median|``). NaN when every draw is equal."""
    s = split_chains(_as_draws(x))
    bulk = _rhat(normal_scores(s))
    folded = _rhat(normal_scores((s - torch.quantile(s, 0.5)).abs()))  # the midpoint median of an even count
    return max(bulk, folded) if not (math.isnan(bulk) or math.isnan(folded)) else math.nan


def _autocov(x: Tensor) -> Tensor:
    """Biased autocovariance ``1/N sum_t (x_t - m)(x_t+k - m)`` of each chain at lags 0..N-1 (by FFT)."""
    n = x.shape[1]
    c = x - x.mean(1, keepdim=True)
    size = 1 << (2 * n - 1).bit_length()
    f = torch.fft.rfft(c, size)
    return torch.fft.irfft(f * f.conj(), size)[:, :n] / n


def ess(x: Tensor | np.ndarray, *, split: bool = True) -> float:
    """Effective sample size of the mean of ``x`` (raw values; the chains split in half unless ``split`` is
    False): ``M N / tau`` with Geyer's initial monotone sequence (module docstring). Equal draws: ``M N``."""
    t = _as_draws(x)
    return _ess(split_chains(t) if split else t)


def _ess(x: Tensor) -> float:
    m, n = x.shape
    total = m * n
    if float(x.max() - x.min()) < 1e-12 * max(1.0, float(x.abs().max())):
        return float(total)  # constant draws: nothing to correlate
    acov = _autocov(x).mean(0)  # [lag], averaged over chains
    w = float(x.var(1, unbiased=True).mean())
    var_plus = (n - 1) / n * w + (float(x.mean(1).var(unbiased=True)) if m > 1 else 0.0)
    rho = 1 - (w - acov) / var_plus
    rho[0] = 1.0
    # Geyer: pairs P_k = rho_2k + rho_2k+1 while positive (lags below n - 2, where every chain contributes)
    n_pairs = max((n - 2) // 2, 1)
    pairs = rho[: 2 * n_pairs].reshape(n_pairs, 2).sum(1)
    negative = (pairs < 0).nonzero()
    kept = pairs[: int(negative[0]) if negative.numel() else n_pairs]
    kept = torch.cummin(kept, 0).values  # initial monotone sequence
    tau = -1 + 2 * float(kept.sum())
    tau = max(tau, 1 / math.log10(total))  # antithetic chains: ESS at most M N log10(M N), as Stan bounds it
    return total / tau


def ess_bulk(x: Tensor | np.ndarray) -> float:
    """ESS of the rank-normalised split chains: how many independent draws the location is worth."""
    return _ess(normal_scores(split_chains(_as_draws(x))))


def ess_tail(x: Tensor | np.ndarray) -> float:
    """The smaller ESS of the indicators ``x <= q_0.05`` and ``x <= q_0.95`` (split chains): how many
    independent draws the 90% interval is worth."""
    s = split_chains(_as_draws(x))
    lo, hi = torch.quantile(s.reshape(-1), torch.tensor([0.05, 0.95], dtype=s.dtype))
    return min(_ess((s <= lo).double()), _ess((s <= hi).double()))


def diagnose(x: Tensor | np.ndarray, what: str = "draws") -> ChainDiagnostics:
    """`rhat`, `ess_bulk` and `ess_tail` of a ``[chains, draws]`` array in one call (``what`` names it in
    the errors)."""
    t = _as_draws(x, what)
    return ChainDiagnostics(
        rhat=rhat(t), ess_bulk=ess_bulk(t), ess_tail=ess_tail(t), chains=t.shape[0], draws=t.shape[1]
    )
