"""An exact reference sampler of the LLC's tempered, localised posterior: Metropolis-corrected Hamiltonian Monte
Carlo (HMC; MALA with one leapfrog step), batched over chains, on the full-batch loss.

`estimate_llc`'s SGLD samples ``p(w) ∝ exp(-nbeta L_n(w) - gamma / 2 |w - w*|^2)`` only up to its step
size's discretisation bias (docs/dynamics.md, "the bias-vs-step curve"), which R-hat cannot see. This module
samples the same target with a Metropolis-Hastings correction, so its only error is Monte Carlo error: the
value it converges to does not depend on the step. It is for separating a sampler's bias from the theory
(what the estimator ``nbeta (E[L_n] - L_n(w*))`` tends to at a finite nbeta and gamma), not for speed: every
iteration is ``leapfrog_steps`` full-batch gradients. With the potential
``U(w) = nbeta L_n(w) + gamma / 2 |w - w*|^2`` and a momentum ``p ~ N(0, I)``, one iteration is::

    p <- p - h / 2 grad U(w);  repeat leapfrog_steps times: w <- w + h p, p <- p - h grad U(w)
    (the last momentum update a half step), accept (w, p) with probability min(1, exp(-dH))

with ``dH`` the change of ``H = U(w) + |p|^2 / 2`` (a NaN proposal is rejected). One leapfrog step of size
``h`` is MALA: the proposal ``w - h^2 / 2 grad U(w) + h N(0, I)`` is SGLD's full-batch step with step size
``h^2``, plus the accept / reject step that removes its bias. The step ``h`` (jittered per chain and iteration
to avoid periodic trajectories) is adapted during burn-in only, by dual averaging towards ``target_accept``
(Hoffman & Gelman 2014, section 3.2), on the acceptance probability averaged over the chains; the draws use
the final step. The per-draw estimate is the full-batch loss of every chain after every iteration, averaged as
in `estimate_llc`: ``per_chain = nbeta (mean_t L_n(w_t) - L_n(w*))``, mean and chain-to-chain SE, with the
R-hat and bulk / tail ESS of `interplab.dynamics.mcmc`.

>>> import torch
>>> from interplab.dynamics import mse_loss
>>> x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
>>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
>>> model = torch.nn.Linear(3, 1, bias=False)
>>> with torch.no_grad():
...     _ = model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
>>> est = estimate_llc_hmc(model, (x, y), mse_loss, HMCConfig(gamma=1.0, chains=8, draws=200, burn_in=100))
>>> 1.2 < est.llc < 1.8 and est.acceptance > 0.5  # d / 2 = 1.5 for a regular model
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from interplab.dynamics import mcmc
from interplab.dynamics.llc import (
    Component,
    Criterion,
    LLCConvergenceWarning,
    _checked_data,
    _diagnostics,
    _llc_of_trace,
    _per_chain,
    default_nbeta,
    finite_or_none,
    sampled,
)
from interplab.model.transformer import Transformer
from interplab.plots import write_figure_files

__all__ = ["HMCConfig", "HMCEstimate", "LowAcceptanceWarning", "estimate_llc_hmc"]

LOW_ACCEPTANCE = 0.3
"""mean acceptance over the draws below this: `LowAcceptanceWarning` (the chains barely move, the SE and ESS
are not worth their cost; at the adapted step it is 0.6-0.9)"""


class LowAcceptanceWarning(UserWarning):
    """The HMC chains accepted too few proposals over the draws (`LOW_ACCEPTANCE`): the message says the fix."""


@dataclass(frozen=True, kw_only=True)
class HMCConfig:
    """Settings of the Metropolis-corrected HMC behind `estimate_llc_hmc` (the target's ``gamma``, ``nbeta``
    and the ``chains`` / ``draws`` / ``burn_in`` / ``seed`` mean what they mean in `SGLDConfig`)."""

    step_size: float = 0.01
    """leapfrog step h (the initial one when ``adapt``); one leapfrog step of h is SGLD's step h^2 + MH"""
    leapfrog_steps: int = 8
    """leapfrog steps per iteration (1: MALA); each is one full-batch gradient of every chain"""
    gamma: float = 100.0
    """strength of the localising Gaussian prior around w*"""
    nbeta: float | None = None
    """n * inverse temperature; None: n / log n for n examples"""
    chains: int = 4
    """independent chains, all stepped at once"""
    draws: int = 200
    """iterations per chain after burn-in, one draw each"""
    burn_in: int = 100
    """iterations per chain before the draws, discarded; the step is adapted during them only"""
    adapt: bool = True
    """adapt the step during burn-in towards ``target_accept`` (False: ``step_size`` throughout)"""
    target_accept: float = 0.8
    """mean acceptance probability the adaptation aims at (0.8 for HMC; about 0.57 is optimal for MALA)"""
    jitter: float = 0.2
    """each chain's step per iteration is uniform in ``[(1 - jitter) h, (1 + jitter) h]``"""
    float64: bool = True
    """sample in float64 (parameters, buffers and floating data), so rounding of the loss stays far below the
    Monte Carlo error at large nbeta; False: the model's own dtype"""
    seed: int = 0
    """seed of the momenta, the jitter and the accept / reject draws: the estimate is a function of it"""

    def __post_init__(self) -> None:
        for name in ("step_size", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HMCConfig.{name} must be a finite number > 0, got {value!r}")
        if self.nbeta is not None and not (math.isfinite(self.nbeta) and self.nbeta > 0):
            raise ValueError(f"HMCConfig.nbeta must be > 0 or None (n / log n), got {self.nbeta!r}")
        for name in ("leapfrog_steps", "chains", "draws"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"HMCConfig.{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.burn_in, int) and self.burn_in >= 0):
            raise ValueError(f"HMCConfig.burn_in must be an integer >= 0, got {self.burn_in!r}")
        if not 0 < self.target_accept < 1:
            raise ValueError(f"HMCConfig.target_accept must be in (0, 1), got {self.target_accept!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"HMCConfig.jitter must be in [0, 1), got {self.jitter!r}")
        if self.adapt and self.burn_in < 1:
            raise ValueError(
                "HMCConfig.adapt adapts the step during burn-in only, so it needs burn_in >= 1, got burn_in 0; "
                "give a burn_in (e.g. 100) or adapt=False"
            )


@dataclass(frozen=True)
class HMCEstimate:
    """An LLC estimate by exact (Metropolis-corrected) HMC: the fields `LLCEstimate` has (``llc`` the mean
    over chains, ``se`` its chain-to-chain SE, ``per_chain``, ``init_loss``, ``trace``, R-hat and ESS), plus the
    acceptance and the step the draws used."""

    llc: float
    se: float
    per_chain: tuple[float, ...]
    init_loss: float
    """L_n(w*) on the whole data"""
    nbeta: float
    n: int
    trace: Tensor
    """full-batch loss of every chain after every iteration, ``[chain, burn_in + draws]``"""
    config: HMCConfig
    acceptance: float
    """mean acceptance probability over the draws and chains"""
    acceptance_per_chain: tuple[float, ...]
    step_size: float
    """the leapfrog step of the draws (adapted during burn-in when ``config.adapt``)"""
    step_trace: Tensor
    """the step at every iteration (before jitter), ``[burn_in + draws]``"""
    distance: Tensor
    """squared distance ``|w - w*|^2`` of every chain after every iteration, ``[chain, burn_in + draws]``: it
    moves along the flat directions of a singular model, which the loss does not see"""
    component: str = "all"
    n_params: int = 0
    rhat: float = math.nan
    """rank-normalised split-R-hat of the draws' losses (`mcmc.rhat`); NaN with < 2 chains or < 4 draws"""
    ess_bulk: float = math.nan
    ess_tail: float = math.nan
    rhat_distance: float = math.nan
    """R-hat of the draws' ``distance``: chains that agree on the loss but not yet on where along the
    singular set they are show here"""

    @property
    def chains(self) -> int:
        return len(self.per_chain)

    @property
    def converged(self) -> bool:
        """R-hat of the loss and of the distance from w* below `mcmc.RHAT_THRESHOLD` (False when they could
        not be computed)."""
        return max(self.rhat, self.rhat_distance) < mcmc.RHAT_THRESHOLD

    def summary(self) -> str:
        """One line: the LLC with its SE, the acceptance, the step and the chains' diagnostics."""
        diag = (
            "R-hat n/a"
            if math.isnan(self.rhat)
            else f"R-hat {self.rhat:.3f} (of |w - w*|^2: {self.rhat_distance:.3f}), ESS bulk "
            f"{self.ess_bulk:.0f} / tail {self.ess_tail:.0f}"
        )
        return (
            f"HMC LLC ({self.component}) {self.llc:.4g} ± {self.se:.2g} from {self.chains} chains x "
            f"{self.config.draws} draws ({self.config.leapfrog_steps} leapfrog steps of {self.step_size:.3g}); "
            f"acceptance {self.acceptance:.2f}; {diag}"
        )

    def to_dict(self, *, trace: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sampler": "hmc",
            "component": self.component,
            "llc": self.llc,
            "se": self.se,
            "per_chain": list(self.per_chain),
            "init_loss": self.init_loss,
            "nbeta": self.nbeta,
            "n": self.n,
            "n_params": self.n_params,
            "acceptance": self.acceptance,
            "acceptance_per_chain": list(self.acceptance_per_chain),
            "step_size": self.step_size,
            "rhat": finite_or_none(self.rhat),
            "ess_bulk": finite_or_none(self.ess_bulk),
            "ess_tail": finite_or_none(self.ess_tail),
            "rhat_distance": finite_or_none(self.rhat_distance),
            "config": asdict(self.config),
        }
        if trace:
            out["trace"] = self.trace.tolist()
        return out

    def plot(self) -> Any:
        """The chains' loss traces against iteration (burn-in shaded, L(w*) dotted) above the leapfrog step
        (log scale): the adaptation should have settled before the shaded burn-in ends."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06)
        for c, row in enumerate(self.trace.tolist()):
            fig.add_trace(go.Scatter(y=row, mode="lines", name=f"chain {c}"), row=1, col=1)
        fig.add_trace(
            go.Scatter(y=self.step_trace.tolist(), mode="lines", name="step", line_color="black"),
            row=2,
            col=1,
        )
        fig.add_hline(y=self.init_loss, line_dash="dot", line_color="gray", row=1, col=1)
        if self.config.burn_in:
            fig.add_vrect(x0=0, x1=self.config.burn_in, fillcolor="gray", opacity=0.12, line_width=0)
        fig.update_yaxes(title_text="full-batch loss", row=1, col=1)
        fig.update_yaxes(title_text="leapfrog step", type="log", row=2, col=1)
        fig.update_xaxes(title_text="HMC iteration", row=2, col=1)
        fig.update_layout(title=self.summary(), width=900, height=520, title_font_size=12)
        return fig

    def save(self, folder: str | Path) -> dict[str, str | None]:
        """Write ``trace.html`` and ``trace.png`` (the `plot`) into ``folder``; the paths (``png`` None, with
        ``png_error`` saying why, when no renderer works)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        return write_figure_files(self.plot(), folder, "trace")


class _Flat:
    """The sampled parameters as one flat vector per chain: ``params(v)`` gives the model's parameters with
    the entries of ``v`` (``[numel]``, the component's entries in name order) and the rest at w*."""

    def __init__(self, model: nn.Module, component: Component | None, dtype: torch.dtype | None) -> None:
        named = dict(model.named_parameters())
        masks, fixed = sampled(model, component)

        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()

        self.frozen = {k: cast(v) for k, v in fixed.items()}
        self.sampled = [(k, cast(named[k]), masks[k]) for k in named if k in masks]
        pieces = []
        for _, w, mask in self.sampled:
            pieces.append(w.reshape(-1) if mask is None else w[mask.to(w.device)])
        self.w0 = torch.cat(pieces)
        self.numel = self.w0.numel()

    def params(self, v: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, w, mask in self.sampled:
            if mask is None:
                out[name] = v[start : start + w.numel()].reshape(w.shape)
                start += w.numel()
            else:
                m = mask.to(w.device).reshape(-1)
                count = int(m.sum())
                index = (torch.cumsum(m, 0) - 1).clamp(min=0) + start  # the entry of v behind each masked one
                out[name] = torch.where(m, v[index], w.reshape(-1)).reshape(w.shape)
                start += count
        return out


def estimate_llc_hmc(
    model: nn.Module,
    data: Sequence[Tensor],
    criterion: Criterion,
    config: HMCConfig | None = None,
    *,
    component: Component | None = None,
    vectorize: bool | None = None,
) -> HMCEstimate:
    """The LLC of ``model`` at its current weights on ``data`` by exact (Metropolis-corrected) HMC of
    `estimate_llc`'s target, on the full-batch loss: the same arguments (``data`` with the examples along the
    first axis, the model called on ``data[0]``, ``criterion(output, batch)`` the mean loss; ``component``
    samples only its parameters), the same estimator, no step-size bias. The model is not changed.

    Warns `LowAcceptanceWarning` (with the fix) when the draws accepted less than `LOW_ACCEPTANCE` of their
    proposals, and `LLCConvergenceWarning` when R-hat is above `mcmc.RHAT_THRESHOLD`. ``vectorize`` as in
    `estimate_llc` (None: per chain for an interplab `Transformer`, one `torch.func.vmap` otherwise)."""
    cfg = config or HMCConfig()
    data, n = _checked_data(data)
    nbeta = cfg.nbeta if cfg.nbeta is not None else default_nbeta(n)
    dtype = torch.float64 if cfg.float64 else None
    flat = _Flat(model, component, dtype)
    if dtype is not None:
        data = tuple(x.to(dtype) if x.is_floating_point() else x for x in data)

    def loss_of(p: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        params = flat.params(p["w"])
        return criterion(functional_call(model, {**flat.frozen, **params}, (batch[0],)), batch)

    if vectorize is None:
        vectorize = not isinstance(model, Transformer)
    grad_fn = (
        vmap(grad_and_value(loss_of), in_dims=(0, None))
        if vectorize
        else _per_chain(grad_and_value(loss_of), batched=False)
    )
    C, w0 = cfg.chains, flat.w0

    def potential(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(U [chain], grad U [chain numel], L_n [chain])`` at ``w [chain numel]``."""
        grads, loss = grad_fn({"w": w}, data)
        delta = w - w0
        u = nbeta * loss + cfg.gamma / 2 * (delta**2).sum(1)
        return u.detach(), (nbeta * grads["w"] + cfg.gamma * delta).detach(), loss.detach()

    w = w0.unsqueeze(0).repeat(C, 1)
    u, grad_u, loss = potential(w)
    init_loss = float(loss[0])
    if not math.isfinite(init_loss):
        raise ValueError(f"the loss at the model's weights w* is {init_loss}: HMC needs a finite L_n(w*)")
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    total = cfg.burn_in + cfg.draws
    trace = torch.empty(C, total, dtype=torch.float64)
    accept_prob = torch.empty(C, total, dtype=torch.float64)
    distance = torch.empty(C, total, dtype=torch.float64)
    steps = torch.empty(total, dtype=torch.float64)
    adapt = _DualAveraging(cfg.step_size, cfg.target_accept)
    h = cfg.step_size
    for t in range(total):
        if t == cfg.burn_in and cfg.adapt:
            h = adapt.final()
        steps[t] = h
        jit = 1 + cfg.jitter * (2 * torch.rand(C, 1, generator=gen, dtype=torch.float64) - 1)
        eps = (h * jit).to(w)
        p = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w)
        w_new, p_new, u_new, g_new, loss_new = _leapfrog(potential, w, p, grad_u, eps, cfg.leapfrog_steps)
        d_h = (u_new + 0.5 * (p_new**2).sum(1)) - (u + 0.5 * (p**2).sum(1))
        log_a = torch.where(torch.isnan(d_h), torch.full_like(d_h, -math.inf), -d_h).clamp(max=0)
        accept = torch.log(torch.rand(C, generator=gen, dtype=torch.float64)).to(w) < log_a
        w = torch.where(accept[:, None], w_new, w)
        grad_u = torch.where(accept[:, None], g_new, grad_u)
        u, loss = torch.where(accept, u_new, u), torch.where(accept, loss_new, loss)
        accept_prob[:, t] = log_a.exp().double().cpu()
        if cfg.adapt and t < cfg.burn_in:
            h = adapt.update(float(accept_prob[:, t].mean()))
        trace[:, t] = loss.double().cpu()
        distance[:, t] = ((w - w0) ** 2).sum(1).double().cpu()
    draws = slice(cfg.burn_in, total)
    per_chain, se, rhat, ess_bulk, ess_tail = _llc_of_trace(trace, cfg.burn_in, nbeta, init_loss)
    acc = accept_prob[:, draws].mean(1)
    est = HMCEstimate(
        llc=float(per_chain.mean()),
        se=se,
        per_chain=tuple(per_chain.tolist()),
        init_loss=init_loss,
        nbeta=nbeta,
        n=n,
        trace=trace,
        config=cfg,
        acceptance=float(acc.mean()),
        acceptance_per_chain=tuple(acc.tolist()),
        step_size=h,
        step_trace=steps,
        distance=distance,
        component=component.name if component is not None else "all",
        n_params=flat.numel,
        rhat=rhat,
        ess_bulk=ess_bulk,
        ess_tail=ess_tail,
        rhat_distance=_diagnostics(distance, cfg.burn_in)[0],
    )
    if est.acceptance < LOW_ACCEPTANCE:
        warnings.warn(_low_acceptance(est), LowAcceptanceWarning, stacklevel=2)
    if not math.isnan(rhat) and not est.converged:
        warnings.warn(
            f"the HMC chains of the LLC estimate ({est.component}: {est.llc:.4g} ± {est.se:.2g}) have not mixed: "
            f"R-hat {rhat:.3f} (of |w - w*|^2: {est.rhat_distance:.3f}), threshold {mcmc.RHAT_THRESHOLD} (ESS bulk {ess_bulk:.0f} / tail {ess_tail:.0f} of "
            f"{C * cfg.draws} draws); more draws (try {4 * cfg.draws}), a longer burn_in (try "
            f"{max(4 * cfg.burn_in, 100)}) or more leapfrog_steps (try {2 * cfg.leapfrog_steps}) per iteration",
            LLCConvergenceWarning,
            stacklevel=2,
        )
    return est


def _leapfrog(
    potential: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    w: Tensor,
    p: Tensor,
    grad_u: Tensor,
    eps: Tensor,
    n_steps: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``n_steps`` leapfrog steps of size ``eps [chain 1]`` from ``(w, p)``, ``grad_u`` the gradient at ``w``:
    ``(w, p, U, grad U, L_n)`` at the end."""
    p = p - eps / 2 * grad_u
    for i in range(n_steps):
        w = w + eps * p
        u, grad_u, loss = potential(w)
        p = p - (eps if i < n_steps - 1 else eps / 2) * grad_u
    return w, p, u, grad_u, loss


class _DualAveraging:
    """Nesterov's dual averaging of ``log h`` towards a mean acceptance ``target`` (Hoffman & Gelman 2014,
    algorithm 5: ``gamma = 0.05``, ``t0 = 10``, ``kappa = 0.75``, ``mu = log(10 h0)``)."""

    def __init__(self, h0: float, target: float) -> None:
        self.mu, self.target = math.log(10 * h0), target
        self.t, self.h_bar, self.log_avg = 0, 0.0, math.log(h0)

    def update(self, accept: float) -> float:
        """The next step after an iteration with mean acceptance probability ``accept``."""
        self.t += 1
        t = self.t
        self.h_bar += ((self.target - accept) - self.h_bar) / (t + 10)
        log_h = self.mu - math.sqrt(t) / 0.05 * self.h_bar
        weight = t**-0.75
        self.log_avg = weight * log_h + (1 - weight) * self.log_avg
        return math.exp(log_h)

    def final(self) -> float:
        """The averaged step, used for the draws."""
        return math.exp(self.log_avg)


def _low_acceptance(est: HMCEstimate) -> str:
    cfg = est.config
    head = (
        f"HMC accepted only {est.acceptance:.2f} of its proposals over the draws (below {LOW_ACCEPTANCE}) with "
        f"{cfg.leapfrog_steps} leapfrog steps of {est.step_size:.3g}: the chains barely move. "
    )
    if cfg.adapt:
        return head + (
            f"The step adaptation has not settled: a longer burn_in (try {max(4 * cfg.burn_in, 200)}), or a "
            f"smaller initial step_size (try {est.step_size / 4:.3g})"
        )
    return head + f"Use a smaller step_size (try {cfg.step_size / 4:.3g}) or adapt=True with a burn_in"
