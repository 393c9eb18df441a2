"""The local learning coefficient (LLC) of a trained model, estimated by SGLD around its weights.

For weights ``w*`` and an empirical loss ``L_n`` over ``n`` examples, the LLC is estimated as (Lau et al. 2023,
devinterp's estimator)::

    llc = nbeta * (E_w[L_n(w)] - L_n(w*)),   w ~ exp(-nbeta * L_n(w) - gamma / 2 * |w - w*|^2)

with ``nbeta`` = n * beta (default ``n / log n``: the inverse temperature ``1 / log n``) and the localising
prior of strength ``gamma``. The expectation is sampled with stochastic-gradient Langevin dynamics::

    w <- w - step_size / 2 * (nbeta * grad L_batch(w) + gamma * (w - w*)) + N(0, step_size)

All chains run at once: the parameters of every chain are one flat buffer (each parameter a ``[chain, ...]``
block), so the noise and the update are one tensor operation per step. Each chain's minibatch loss and
gradient come from the chain-batched forward of `interplab.dynamics.chains` for an interplab `Transformer`
with `lm_loss`, else from `torch.func.grad_and_value` over `torch.func.functional_call` (all chains in one
`torch.func.vmap`, or one call per chain with ``vectorize=False``): the same numbers to float rounding, no
Python loop over examples. A *component* (one head, one layer) is sampled by
restricting the update to a mask of the parameters, the rest frozen at ``w*``.

>>> import torch
>>> x = torch.randn(200, 3); y = x @ torch.tensor([1.0, -2.0, 0.5])
>>> model = torch.nn.Linear(3, 1, bias=False)
>>> est = estimate_llc(model, (x, y[:, None]), mse_loss, SGLDConfig(step_size=1e-3, draws=50, burn_in=20))
>>> est.chains
4
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from interplab.dynamics import mcmc
from interplab.dynamics.chains import ChainLoss, unsupported
from interplab.io import atomic_write_text
from interplab.model.transformer import Transformer
from interplab.plots import figure_html, write_image

Criterion = Callable[[Tensor, tuple[Tensor, ...]], Tensor]
"""``criterion(model_output, batch) -> scalar loss``; the model is called on ``batch[0]``."""


def mse_loss(output: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
    """Half the mean squared error (the Gaussian negative log-likelihood with unit variance, up to a constant):
    the loss of the regression cases whose learning coefficient is known."""
    return 0.5 * ((output - batch[1]) ** 2).sum(-1).mean()


def lm_loss(logits: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
    """Next-token cross-entropy of a language model on ``batch[0]`` (tokens ``[batch pos]``)."""
    tokens = batch[0]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


class SGLDDivergence(ValueError):
    """A chain's loss became NaN or exploded: the sampler settings diverge; the message says the fix."""


class LLCConvergenceWarning(UserWarning):
    """The SGLD chains of an LLC estimate have not mixed (R-hat above `mcmc.RHAT_THRESHOLD`): the message says
    what to change. A warning, not an error: the estimate is still returned, with its `rhat` to judge it by."""


@dataclass(frozen=True, kw_only=True)
class SGLDConfig:
    """Settings of the SGLD sampler behind `estimate_llc` (devinterp's names in brackets)."""

    step_size: float = 1e-4
    """SGLD step size epsilon [lr]; too large diverges, too small mixes slowly"""
    gamma: float = 100.0
    """strength of the localising Gaussian prior around w* [localization]"""
    nbeta: float | None = None
    """n * inverse temperature [nbeta]; None: n / log n for n examples (the WBIC temperature)"""
    chains: int = 4
    """independent chains, all stepped at once [num_chains]"""
    draws: int = 200
    """draws per chain after burn-in, one per step [num_draws]"""
    burn_in: int = 50
    """steps per chain before the draws, discarded [num_burnin_steps]"""
    batch_size: int | None = 64
    """examples per SGLD minibatch (each chain draws its own); None: the whole data set every step"""
    seed: int = 0
    """seed of the minibatches and the Langevin noise: the estimate is a function of it"""
    explode: float = 100.0
    """a loss trace counts as diverged when ``loss - L(w*)`` exceeds ``explode * max(1, |L(w*)|)``"""

    def __post_init__(self) -> None:
        for name in ("step_size", "gamma", "explode"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SGLDConfig.{name} must be a finite number > 0, got {value!r}")
        if self.nbeta is not None and not (math.isfinite(self.nbeta) and self.nbeta > 0):
            raise ValueError(f"SGLDConfig.nbeta must be > 0 or None (n / log n), got {self.nbeta!r}")
        for name in ("chains", "draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"SGLDConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.burn_in < 0:
            raise ValueError(f"SGLDConfig.burn_in must be >= 0, got {self.burn_in}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"SGLDConfig.batch_size must be >= 1 or None, got {self.batch_size}")


def default_nbeta(n: int) -> float:
    """``n / log n``: the inverse temperature 1 / log n of the WBIC, times n."""
    if n < 2:
        raise ValueError(f"the default nbeta needs n >= 2 examples, got {n}")
    return n / math.log(n)


@dataclass(frozen=True)
class LLCEstimate:
    """An LLC estimate with its loss traces: ``llc`` is the mean over chains, ``se`` its chain-to-chain
    standard error."""

    llc: float
    se: float
    per_chain: tuple[float, ...]
    init_loss: float
    """L_n(w*) on the whole data"""
    nbeta: float
    n: int
    trace: Tensor
    """minibatch loss of every chain at every step, ``[chain, burn_in + draws]``"""
    config: SGLDConfig
    component: str = "all"
    """which parameters were sampled ("all", or a component's name)"""
    n_params: int = 0
    """how many parameters (scalars) were sampled"""
    rhat: float = math.nan
    """rank-normalised split-R-hat of the draws' losses over chains (`mcmc.rhat`; the per-draw LLC is an
    increasing affine map of the loss, so it has the same R-hat and ESS); NaN with < 2 chains or < 4 draws"""
    ess_bulk: float = math.nan
    """bulk effective sample size of the draws, all chains together (`mcmc.ess_bulk`)"""
    ess_tail: float = math.nan
    """tail effective sample size of the draws (`mcmc.ess_tail`)"""

    @property
    def chains(self) -> int:
        return len(self.per_chain)

    @property
    def converged(self) -> bool:
        """R-hat below `mcmc.RHAT_THRESHOLD` (False when it could not be computed)."""
        return self.rhat < mcmc.RHAT_THRESHOLD

    def diagnostics_text(self) -> str:
        """``R-hat 1.003, ESS bulk 812 / tail 640``, or why there are none."""
        if math.isnan(self.rhat):
            return f"R-hat n/a (needs >= {mcmc.MIN_CHAINS} chains of >= {mcmc.MIN_DRAWS} draws)"
        return f"R-hat {self.rhat:.3f}, ESS bulk {self.ess_bulk:.0f} / tail {self.ess_tail:.0f}"

    def summary(self) -> str:
        """One line: the LLC with its SE and the chains' convergence diagnostics."""
        verdict = "" if math.isnan(self.rhat) else (": mixed" if self.converged else ": NOT mixed")
        return (
            f"LLC ({self.component}) {self.llc:.4g} ± {self.se:.2g} from {self.chains} chains x "
            f"{self.config.draws} draws; {self.diagnostics_text()}{verdict}"
        )

    def to_dict(self, *, trace: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "component": self.component,
            "llc": self.llc,
            "se": self.se,
            "per_chain": list(self.per_chain),
            "init_loss": self.init_loss,
            "nbeta": self.nbeta,
            "n": self.n,
            "n_params": self.n_params,
            "rhat": finite_or_none(self.rhat),
            "ess_bulk": finite_or_none(self.ess_bulk),
            "ess_tail": finite_or_none(self.ess_tail),
            "config": asdict(self.config),
        }
        if trace:
            out["trace"] = self.trace.tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LLCEstimate:
        """The inverse of `to_dict` (with its trace; without one the trace is empty). A file written before the
        diagnostics existed gets them recomputed from its trace (NaN without one)."""
        config = SGLDConfig(**data["config"])
        trace = torch.tensor(data.get("trace", []), dtype=torch.float32)
        if "rhat" in data:
            diag = tuple(
                math.nan if data[k] is None else float(data[k]) for k in ("rhat", "ess_bulk", "ess_tail")
            )
        else:
            diag = _diagnostics(trace, config.burn_in) if trace.dim() == 2 else (math.nan,) * 3
        return cls(
            llc=float(data["llc"]),
            se=float(data["se"]),
            per_chain=tuple(float(v) for v in data["per_chain"]),
            init_loss=float(data["init_loss"]),
            nbeta=float(data["nbeta"]),
            n=int(data["n"]),
            trace=trace,
            config=config,
            component=str(data.get("component", "all")),
            n_params=int(data.get("n_params", 0)),
            rhat=diag[0],
            ess_bulk=diag[1],
            ess_tail=diag[2],
        )

    def plot(self) -> Any:
        """The loss trace of every chain against step (burn-in shaded), with L(w*) dotted: the diagnostic to
        look at before trusting a number (a trace that has not flattened after burn-in has not mixed). The
        title gives R-hat and the ESSs, in red when R-hat is above `mcmc.RHAT_THRESHOLD`."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for c, row in enumerate(self.trace.tolist()):
            fig.add_scatter(y=row, mode="lines", name=f"chain {c}")
        fig.add_hline(y=self.init_loss, line_dash="dot", line_color="gray", annotation_text="L(w*)")
        if self.config.burn_in:
            fig.add_vrect(x0=0, x1=self.config.burn_in, fillcolor="gray", opacity=0.12, line_width=0)
        bad = not math.isnan(self.rhat) and not self.converged
        note = self.diagnostics_text() + (f" > {mcmc.RHAT_THRESHOLD}: not mixed" if bad else "")
        fig.update_layout(
            title={
                "text": f"SGLD loss traces ({self.component}): LLC {self.llc:.3g} ± {self.se:.2g}<br>"
                f"<sub>{note}</sub>",
                "font": {"color": "firebrick" if bad else "black"},
            },
            xaxis_title="SGLD step",
            yaxis_title="minibatch loss",
            width=800,
            height=420,
        )
        return fig

    def save(self, folder: str | Path) -> dict[str, str | None]:
        """Write ``trace.html`` and ``trace.png`` (the `plot`) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fig = self.plot()
        atomic_write_text(folder / "trace.html", figure_html(fig, folder))
        error = write_image(fig, folder / "trace.png")
        return {"html": str(folder / "trace.html"), "png": None if error else str(folder / "trace.png")}


@dataclass(frozen=True)
class Component:
    """A part of a model's parameters: per parameter name, a boolean mask of the entries sampled (None: the
    whole tensor)."""

    name: str
    masks: Mapping[str, Tensor | None] = field(default_factory=dict)

    @classmethod
    def matching(cls, model: nn.Module, *patterns: str, name: str | None = None) -> Component:
        """Every parameter whose name matches one of the glob ``patterns`` (``"blocks.1.*"``)."""
        free = trainable(model)
        names = [n for n in free if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not names:
            raise ValueError(
                f"no trainable parameter matches {list(patterns)} (parameters with requires_grad=False are "
                f"not sampled); the model's trainable parameters: {', '.join(free)}"
            )
        return cls(name or ",".join(patterns), dict.fromkeys(names))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the LLC samples: ``model.named_parameters()`` with ``requires_grad=True``, in order.
    The others (an interplab `Transformer`'s biases switched off by its config: ``unembed.b_U`` without
    ``unembed_bias``, the attention and MLP biases without ``attn_bias`` / ``mlp_bias``) are never trained,
    so they are no free parameters of the model: they stay at their values like buffers."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def sampled(
    model: nn.Module, component: Component | None
) -> tuple[dict[str, Tensor | None], dict[str, Tensor]]:
    """The masks of the entries sampled (the `component`'s, or every `trainable` parameter whole) and the
    model's fixed tensors (buffers and every parameter not sampled, detached), for every sampler here."""
    named = dict(model.named_parameters())
    free = trainable(model)
    masks = dict(component.masks) if component is not None else dict.fromkeys(free)
    if not masks:
        raise ValueError(
            f"nothing to sample: none of the model's {len(named)} parameters has requires_grad=True (the LLC "
            "samples trainable parameters only); unfreeze the ones to sample, e.g. model.requires_grad_(True)"
        )
    unknown = sorted(set(masks) - set(named))
    if unknown:
        raise ValueError(f"component names parameters the model lacks: {unknown}")
    fixed = sorted(set(masks) - set(free))
    if fixed:
        raise ValueError(
            f"component names parameters with requires_grad=False, which the model never trains and the "
            f"LLC does not sample: {fixed}; the trainable ones: {', '.join(free)}"
        )
    frozen = {k: v.detach() for k, v in model.named_buffers()}
    frozen |= {k: v.detach() for k, v in named.items() if k not in masks}
    return masks, frozen


def head_component(model: nn.Module, layer: int, head: int) -> Component:
    """One attention head of an interplab `Transformer`: its slices of W_Q, W_K, W_V, W_O and their biases
    (the ``[n_heads ...]`` axis is the first of each; the biases only where they are `trainable`)."""
    prefix = f"blocks.{layer}.attn."
    masks: dict[str, Tensor | None] = {}
    for name, p in trainable(model).items():
        if name.startswith(prefix) and name[len(prefix) :] in _HEAD_PARAMS:
            if head >= p.shape[0]:
                raise ValueError(f"head {head} out of range: {name} has {p.shape[0]} heads")
            mask = torch.zeros(p.shape, dtype=torch.bool)
            mask[head] = True
            masks[name] = mask
    if not masks:
        raise ValueError(
            f"layer {layer} has no trainable attention weights {sorted(_HEAD_PARAMS)} in this model"
        )
    return Component(f"L{layer}H{head}", masks)


_HEAD_PARAMS = {"W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"}


def layer_component(model: nn.Module, layer: int) -> Component:
    """Every parameter of block ``layer``."""
    return Component.matching(model, f"blocks.{layer}.*", name=f"layer {layer}")


def estimate_llc(
    model: nn.Module,
    data: Sequence[Tensor],
    criterion: Criterion,
    config: SGLDConfig | None = None,
    *,
    component: Component | None = None,
    observables: Mapping[str, Sequence[Tensor]] | None = None,
    vectorize: bool | None = None,
    compile: bool = False,
) -> LLCEstimate:
    """Estimate the LLC of ``model`` at its current weights on ``data`` (tensors with the examples along the
    first axis; the model is called on ``data[0]``, ``criterion(output, batch)`` gives the mean loss).

    ``component`` restricts SGLD to its parameters (the others stay at w*). The model is not changed. Raises
    `SGLDDivergence` (with the fix) when a chain's loss becomes NaN or explodes.

    ``vectorize``: how each step computes the chains' losses and gradients (the same numbers to float
    rounding, the same minibatches and noise for a seed; the parameters, noise and updates of all chains are
    one flat buffer either way). None (the default): an interplab `Transformer` with the next-token loss
    `lm_loss` on token windows takes the chain-batched forward of `interplab.dynamics.chains` (every chain in
    one forward and backward, batched matmuls over the chains; `interplab.dynamics.chains.unsupported` says
    which models it covers), other transformers one call per chain, other modules one `torch.func.vmap` over
    the chains; True: `torch.func.vmap`; False: one `torch.func.grad_and_value` call per chain (the
    reference path).

    ``compile``: run the chain-batched forward and backward through `torch.compile` (inductor fuses the
    elementwise work around the matmuls: 1.3-1.5x per step on CPU, `benchmarks/bench_llc.py`). The first
    estimate of an architecture and minibatch shape pays the compile (40-60 s on two CPU cores, ~5 s from
    inductor's on-disk cache in a later process); later estimates of the same shape (the checkpoints of a run,
    the components) reuse it. Needs the chain-batched path (``vectorize=None`` on a model it covers); the
    numbers equal the eager path's to float rounding."""
    cfg = config or SGLDConfig()
    est, _ = _sample(model, data, criterion, cfg, component, observables or {}, vectorize, compile)
    return est


def _sample(
    model: nn.Module,
    data: Sequence[Tensor],
    criterion: Criterion,
    cfg: SGLDConfig,
    component: Component | None,
    observables: Mapping[str, Sequence[Tensor]],
    vectorize: bool | None = None,
    compile: bool = False,
) -> tuple[LLCEstimate, dict[str, Tensor]]:
    data, n = _checked_data(data)
    nbeta = cfg.nbeta if cfg.nbeta is not None else default_nbeta(n)
    named = dict(model.named_parameters())
    masks, frozen = sampled(model, component)
    w0 = {k: named[k].detach().clone() for k in masks}
    mask_t = {k: (None if m is None else m.to(w0[k].device)) for k, m in masks.items()}
    n_params = sum(w0[k].numel() if m is None else int(m.sum()) for k, m in mask_t.items())

    def loss_of(params: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        return criterion(functional_call(model, {**frozen, **params}, (batch[0],)), batch)

    C = cfg.chains
    flat = _Flat(w0, C)
    kernel = _chain_kernel(model, data, criterion) if vectorize is None else None
    if compile and kernel is None:
        why = f"vectorize={vectorize}" if vectorize is not None else _no_kernel(model, data, criterion)
        raise ValueError(
            f"compile=True needs the chain-batched path of interplab.dynamics.chains, which this estimate "
            f"does not take ({why}); leave compile=False"
        )
    if kernel is not None:
        step, evaluate = _kernel_step(kernel, flat, compile), _kernel_evaluate(kernel, cfg.batch_size)
        with torch.no_grad():
            init_loss = float(_full_loss(lambda p, b: kernel({}, b[0][None])[0], w0, data, cfg.batch_size))
    else:
        with torch.no_grad():
            init_loss = float(_full_loss(loss_of, w0, data, cfg.batch_size))
        if vectorize is None:
            vectorize = not isinstance(model, Transformer)
        if vectorize:
            generic, evaluate = (
                vmap(grad_and_value(loss_of), in_dims=(0, 0)),
                vmap(loss_of, in_dims=(0, None)),
            )
        else:
            generic, evaluate = _per_chain(grad_and_value(loss_of)), _per_chain(loss_of, batched=False)
        step = _generic_step(generic, flat)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    w_flat = flat.stack(w0)  # every chain starts at w*
    start = w_flat.clone()
    mask_flat = flat.mask(mask_t)
    noise = torch.empty_like(w_flat)
    noise_views = flat.views(noise)
    w = flat.views(w_flat)
    total = cfg.burn_in + cfg.draws
    trace = torch.empty(C, total, device=w_flat.device)
    obs: dict[str, list[Tensor]] = {name: [] for name in observables}
    eps = cfg.step_size
    checked = 0
    for t in range(total):
        if cfg.batch_size is None or cfg.batch_size >= n:
            batch = tuple(x.unsqueeze(0).expand(C, *x.shape) for x in data)
        else:
            idx = torch.stack([torch.randperm(n, generator=gen)[: cfg.batch_size] for _ in range(C)])
            batch = tuple(x[idx.to(x.device)] for x in data)
        grads, losses = step(w_flat, w, batch)
        trace[:, t] = losses.detach().float()
        if t + 1 - checked >= _CHECK_EVERY or t + 1 == total or observables:
            _check(trace, checked, t + 1, init_loss, cfg)  # from the first step not yet checked
            checked = t + 1
        with torch.no_grad():
            if t >= cfg.burn_in:
                for name, obs_data in observables.items():
                    obs[name].append(evaluate(w, tuple(obs_data)).double().cpu())
            for k in w:  # the same draws, in the same order, as one randn per parameter
                noise_views[k].normal_(generator=gen)
            delta = -0.5 * eps * (nbeta * grads + cfg.gamma * (w_flat - start)) + math.sqrt(eps) * noise
            if mask_flat is not None:
                delta = delta * mask_flat
            w_flat += delta
    trace = trace.cpu()
    per_chain, se, rhat, ess_bulk, ess_tail = _llc_of_trace(trace, cfg.burn_in, nbeta, init_loss)
    est = LLCEstimate(
        llc=float(per_chain.mean()),
        se=se,
        per_chain=tuple(per_chain.tolist()),
        init_loss=init_loss,
        nbeta=nbeta,
        n=n,
        trace=trace,
        config=cfg,
        component=component.name if component is not None else "all",
        n_params=n_params,
        rhat=rhat,
        ess_bulk=ess_bulk,
        ess_tail=ess_tail,
    )
    if not math.isnan(rhat) and not est.converged:
        warnings.warn(_not_mixed(est), LLCConvergenceWarning, stacklevel=3)
    return est, {name: torch.stack(v, 1) for name, v in obs.items()}


def _checked_data(data: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], int]:
    """``data`` as a tuple and its number of examples (the first axis of every tensor); refused when empty or
    when the tensors disagree on it."""
    data = tuple(data)
    if not data:
        raise ValueError("data is empty: give at least the model's inputs")
    n = data[0].shape[0]
    if any(t.shape[0] != n for t in data):
        raise ValueError(f"data tensors disagree on the number of examples: {[t.shape[0] for t in data]}")
    return data, n


def _chain_se(per_chain: Tensor) -> float:
    """The chain-to-chain standard error of the mean of ``per_chain`` (NaN with one chain)."""
    chains = per_chain.shape[0]
    return float(per_chain.std(unbiased=True) / math.sqrt(chains)) if chains > 1 else math.nan


def _llc_of_trace(
    trace: Tensor, burn_in: int, nbeta: float, init_loss: float
) -> tuple[Tensor, float, float, float, float]:
    """The estimator on a ``[chain, step]`` loss trace, for every sampler here: ``(per_chain, se, rhat,
    ess_bulk, ess_tail)`` with ``per_chain = nbeta (mean of the draws' losses - L(w*))`` in float64."""
    per_chain = nbeta * (trace[:, burn_in:].double().mean(1) - init_loss)
    return (per_chain, _chain_se(per_chain), *_diagnostics(trace, burn_in))


def _diagnostics(trace: Tensor, burn_in: int) -> tuple[float, float, float]:
    """``(rhat, ess_bulk, ess_tail)`` of the draws of a ``[chain, step]`` loss trace (NaN when too short)."""
    draws = trace[:, burn_in:]
    if draws.shape[0] < mcmc.MIN_CHAINS or draws.shape[1] < mcmc.MIN_DRAWS:
        return math.nan, math.nan, math.nan
    d = mcmc.diagnose(draws, "the SGLD loss trace")
    return d.rhat, d.ess_bulk, d.ess_tail


def _not_mixed(est: LLCEstimate) -> str:
    """The warning for unmixed chains, with the likely cause first: every chain's loss still moving the same
    way (too short a burn-in, or a step too small to leave w*), else slow wandering or disagreeing chains."""
    cfg = est.config
    draws = est.trace[:, cfg.burn_in :].double()
    half = draws.shape[1] // 2
    drift = (draws[:, -half:].mean(1) - draws[:, :half].mean(1)) / max(float(draws.std()), 1e-30)
    head = (
        f"the SGLD chains of the LLC estimate ({est.component}: {est.llc:.4g} ± {est.se:.2g}) have not mixed: "
        f"R-hat {est.rhat:.3f} > {mcmc.RHAT_THRESHOLD} (ESS bulk {est.ess_bulk:.0f} / tail {est.ess_tail:.0f} "
        f"of {est.chains * cfg.draws} draws). "
    )
    settle = f"a longer burn_in (try {max(4 * cfg.burn_in, 100)}) and more draws (try {4 * cfg.draws})"
    if bool((drift > 0.3).all()) or bool((drift < -0.3).all()):
        return head + (
            f"Every chain's loss still moves the same way after the burn-in: {settle}; if the traces creep "
            f"away from L(w*) for the whole run, the step is too small to explore (try step_size "
            f"{cfg.step_size * 10:g}). Look at .plot()"
        )
    return head + (
        f"The chains wander slowly or disagree: more draws (try {4 * cfg.draws}); chains settling at different "
        f"levels or drifting apart need a smaller step_size (try {cfg.step_size / 10:g}) or a larger gamma (try "
        f"{cfg.gamma * 10:g}); traces still moving after the shaded burn-in need {settle}. Look at .plot()"
    )


def finite_or_none(v: float) -> float | None:
    """``v``, or None where it is NaN or infinite (JSON has neither)"""
    return v if math.isfinite(v) else None


def _per_chain(fn: Callable[..., Any], batched: bool = True) -> Callable[..., Any]:
    """``fn`` over the chain axis, one call per chain: what `vmap` computes, stacked the same way (the
    batch of each chain when ``batched``, else one batch for all)."""

    def run(w: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Any:
        outs = [
            fn({k: v[c] for k, v in w.items()}, tuple(x[c] for x in batch) if batched else batch)
            for c in range(next(iter(w.values())).shape[0])
        ]
        if isinstance(outs[0], tuple):
            grads = {k: torch.stack([o[0][k] for o in outs]) for k in outs[0][0]}
            return grads, torch.stack([o[1] for o in outs])
        return torch.stack(outs)

    return run


_CHECK_EVERY = 16
"""steps between two divergence checks (each reads the loss trace on the host; the first bad step is found
all the same)"""


def _check(trace: Tensor, lo: int, hi: int, init_loss: float, cfg: SGLDConfig) -> None:
    """Raise `SGLDDivergence` at the first step of ``lo .. hi - 1`` where a chain's loss is NaN or exploded."""
    window = trace[:, lo:hi].cpu()
    bad = ~torch.isfinite(window) | (window - init_loss > cfg.explode * max(1.0, abs(init_loss)))
    if bool(bad.any()):
        step = int(bad.any(0).nonzero()[0])
        chain = int(bad[:, step].nonzero()[0])
        raise SGLDDivergence(
            f"SGLD diverged: chain {chain} reached loss {float(window[chain, step]):.4g} at step {lo + step} "
            f"(L(w*) = {init_loss:.4g}) with step_size {cfg.step_size:g}, gamma {cfg.gamma:g}; use a smaller "
            f"step_size (try {cfg.step_size / 10:g}) or a larger gamma (try {cfg.gamma * 10:g})"
        )


class _Flat:
    """The sampled parameters of all chains in one flat buffer, parameter by parameter (each a contiguous
    ``[C, *shape]`` block, so a per-parameter draw fills the same numbers as ``torch.randn([C, *shape])``):
    one tensor operation updates every parameter of every chain."""

    def __init__(self, w0: Mapping[str, Tensor], chains: int) -> None:
        self.chains = chains
        self.shapes = {k: tuple(v.shape) for k, v in w0.items()}
        self.offsets: dict[str, tuple[int, int]] = {}
        at = 0
        for k, v in w0.items():
            self.offsets[k] = (at, at + chains * v.numel())
            at += chains * v.numel()
        self.size = at

    def views(self, buf: Tensor) -> dict[str, Tensor]:
        return {k: buf[lo:hi].view(self.chains, *self.shapes[k]) for k, (lo, hi) in self.offsets.items()}

    def stack(self, per_param: Mapping[str, Tensor]) -> Tensor:
        """``[C, *shape]`` per parameter (or ``[*shape]``, the same for every chain) as one flat buffer."""
        return torch.cat(
            [per_param[k].expand(self.chains, *self.shapes[k]).reshape(-1) for k in self.offsets]
        )

    def mask(self, masks: Mapping[str, Tensor | None]) -> Tensor | None:
        """The component's masks as a flat 0/1 buffer (None: every entry is sampled)."""
        if all(m is None for m in masks.values()):
            return None
        dev = next(m.device for m in masks.values() if m is not None)
        full = {k: torch.ones(self.shapes[k], device=dev) for k, m in masks.items() if m is None}
        return self.stack(full | {k: m.float() for k, m in masks.items() if m is not None})


def _generic_step(
    step: Callable[..., tuple[dict[str, Tensor], Tensor]], flat: _Flat
) -> Callable[[Tensor, dict[str, Tensor], tuple[Tensor, ...]], tuple[Tensor, Tensor]]:
    """Gradients as one flat buffer from a step that gives them per parameter."""

    def run(w_flat: Tensor, w: dict[str, Tensor], batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        grads, losses = step(w, batch)
        return flat.stack({k: g.detach() for k, g in grads.items()}), losses

    return run


def _no_kernel(model: nn.Module, data: tuple[Tensor, ...], criterion: Criterion) -> str | None:
    """Why the chain-batched loss of `interplab.dynamics.chains` does not compute what ``criterion`` does
    (None: it does, the next-token loss of an interplab Transformer on token windows)."""
    if criterion is not lm_loss:
        return "the criterion is not interplab.dynamics.lm_loss"
    if len(data) != 1 or data[0].dim() != 2 or data[0].shape[1] < 2:
        return "the data is not one [windows, positions >= 2] token tensor"
    return unsupported(model)


def _chain_kernel(model: nn.Module, data: tuple[Tensor, ...], criterion: Criterion) -> ChainLoss | None:
    """The chain-batched loss of `interplab.dynamics.chains` where it computes what ``criterion`` does, else
    None (`_no_kernel` says why)."""
    if _no_kernel(model, data, criterion) is not None:
        return None
    model.check_tokens(data[0])  # type: ignore[operator]  # bad ids, too many positions: named as the model does
    return ChainLoss(model)  # type: ignore[arg-type]


CHAIN_GROUP_TOKENS = 2048
"""tokens (windows x positions, summed over chains) per chain-batched forward: chains are grouped up to this
many, a minibatch this large or larger runs chain by chain (on CPU the activations of many chains together
fall out of the cache and cost more than the separate calls' overhead; 2,048, two chains of 1,024 tokens, was
1.08x / 1.03x faster than 1,024 on bench_llc's small / mid transformer, 4,096 no faster than 1,024)"""


def _call(kernel: ChainLoss, params: Mapping[str, Tensor], tokens: Tensor) -> Tensor:
    return kernel(params, tokens)


_compiled: Callable[[ChainLoss, Mapping[str, Tensor], Tensor], Tensor] | None = None
"""`_call` through `torch.compile`, made on first use: one for the process, so every `ChainLoss` of an
architecture (a run's checkpoints) shares the compiled graphs, guarded on shapes, not on weights"""

RECOMPILE_LIMIT = 64
"""graphs the compiled step may hold (dynamo's default is 8 per function): each set of sampled parameters (a
component: one layer's heads, an MLP, the whole model) and each chain-group shape is a graph of its own, and
past the limit dynamo quietly runs the rest eager (measured: 11 parameter sets gave 8 compiled graphs and 3
eager calls; with this limit 11 graphs)"""


def _compiled_call() -> Callable[[ChainLoss, Mapping[str, Tensor], Tensor], Tensor]:
    global _compiled
    if _compiled is None:
        compiled = torch.compile(_call, dynamic=False)

        def call(kernel: ChainLoss, params: Mapping[str, Tensor], tokens: Tensor) -> Tensor:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled(kernel, params, tokens)

        _compiled = call
    return _compiled


def _kernel_step(
    kernel: ChainLoss, flat: _Flat, compile: bool = False
) -> Callable[[Tensor, dict[str, Tensor], tuple[Tensor, ...]], tuple[Tensor, Tensor]]:
    call = _compiled_call() if compile else _call

    def run(w_flat: Tensor, w: dict[str, Tensor], batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        tokens = batch[0]
        C = tokens.shape[0]
        group = max(1, CHAIN_GROUP_TOKENS // tokens[0].numel())
        grads: dict[str, list[Tensor]] = {k: [] for k in w}
        losses = []
        for lo in range(0, C, group):
            leaves = {k: v[lo : lo + group].detach().requires_grad_() for k, v in w.items()}
            with torch.enable_grad():
                loss = call(kernel, leaves, tokens[lo : lo + group])
                found = torch.autograd.grad(loss.sum(), list(leaves.values()), materialize_grads=True)
            losses.append(loss.detach())
            for k, g in zip(leaves, found, strict=True):
                grads[k].append(g)
        flat_grads = [torch.cat(g).reshape(-1) if len(g) > 1 else g[0].reshape(-1) for g in grads.values()]
        return torch.cat(flat_grads), torch.cat(losses)

    return run


def _kernel_evaluate(kernel: ChainLoss, batch_size: int | None) -> Callable[..., Tensor]:
    """Every chain's loss on the whole of ``data`` ``[C]``, in chunks of ``batch_size`` windows."""

    def run(w: dict[str, Tensor], data: tuple[Tensor, ...]) -> Tensor:
        tokens = data[0]
        n = tokens.shape[0]
        size = n if batch_size is None else batch_size
        C = next(iter(w.values())).shape[0]
        total = torch.zeros(C, dtype=torch.float64)
        for lo in range(0, n, size):
            chunk = tokens[lo : lo + size]
            total += kernel(w, chunk.unsqueeze(0).expand(C, *chunk.shape)).double().cpu() * chunk.shape[0]
        return total / n

    return run


def _full_loss(
    loss_of: Callable[[dict[str, Tensor], tuple[Tensor, ...]], Tensor],
    params: dict[str, Tensor],
    data: tuple[Tensor, ...],
    batch_size: int | None,
) -> Tensor:
    n = data[0].shape[0]
    size = n if batch_size is None else max(batch_size, 1)
    total = torch.zeros((), dtype=torch.float64)
    for lo in range(0, n, size):
        chunk = tuple(x[lo : lo + size] for x in data)
        total += loss_of(params, chunk).double() * chunk[0].shape[0]
    return total / n


@dataclass(frozen=True)
class Susceptibility:
    """How a component's LLC responds to shifting the data from ``q`` towards ``q'``
    (``q_h = (1 - h) q + h q'``): ``chi = d llc_C(h) / dh`` at h = 0, from one set of chains by linear response."""

    component: str
    chi: float
    se: float
    llc: LLCEstimate
    delta_loss: float
    """L_q'(w*) - L_q(w*)"""

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "chi": self.chi,
            "se": self.se,
            "delta_loss": self.delta_loss,
            "llc": self.llc.to_dict(trace=False),
        }


def susceptibility(
    model: nn.Module,
    data: Sequence[Tensor],
    shifted: Sequence[Tensor],
    criterion: Criterion,
    config: SGLDConfig | None = None,
    *,
    component: Component | None = None,
) -> Susceptibility:
    """The susceptibility of a component's LLC to a shift of the data distribution (Baker et al. 2025 study
    how components respond to such shifts, e.g. repeated vs natural text).

    With ``llc(h) = nbeta * (E_h[L_h] - L_h(w*))`` and ``L_h = L_q + h * D`` (``D = L_q' - L_q``), linear
    response under the tempered, localised posterior gives::

        chi = nbeta * (E[D] - D(w*)) - nbeta^2 * Cov(L_q, D)

    both terms read off the same chains (``L_q`` and ``D`` evaluated on the whole of ``data`` and ``shifted``
    at every draw). Per chain, then mean and chain-to-chain SE."""
    cfg = config or SGLDConfig()
    observed = {"q": data, "shifted": shifted}
    est, obs = _sample(model, data, criterion, cfg, component, observed)
    lq, lshift = obs["q"], obs["shifted"]  # [chain draw]
    d = lshift - lq
    named = dict(model.named_parameters())
    frozen = {k: v.detach() for k, v in named.items()} | {k: v.detach() for k, v in model.named_buffers()}
    with torch.no_grad():

        def loss_of(params: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
            return criterion(functional_call(model, params, (batch[0],)), batch)

        d0 = float(
            _full_loss(loss_of, frozen, tuple(shifted), cfg.batch_size)
            - _full_loss(loss_of, frozen, tuple(data), cfg.batch_size)
        )
    nb = est.nbeta
    cov = ((lq - lq.mean(1, keepdim=True)) * (d - d.mean(1, keepdim=True))).mean(1)
    per_chain = nb * (d.mean(1) - d0) - nb**2 * cov
    return Susceptibility(est.component, float(per_chain.mean()), _chain_se(per_chain), est, d0)
