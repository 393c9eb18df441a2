"""Circuit discovery by mask optimisation: a learned mask on every edge of the component graph.

The masks act through `interplab.circuits.masked.MaskedForward` (every receiver slot reads
``m z_s + (1 - m) c_s`` per sender: the sender in the masked run or its corrupted value). Two published ways
to learn them, both minimising the KL divergence to the full model at the task's position (or the loss of
metric) plus a price on the number of edges:

- `Method.UGS`: uniform gradient sampling (Li & Janson 2024), the mask learner MIB (Mueller et al. 2025)
  found best beside EAP-IG. One logit per edge, inclusion probability ``p = sigmoid(theta)``; each step
  every example is run with ``n_samples`` masks sampled as ``1 - clamp((u - p) / w + 1/2, 0, 1)``,
  ``u ~ U(0, 1)``, window ``w = p (1 - p)`` (0/1 except in the window, where the gradient passes); penalty
  ``lam * sum_e p_e`` (plus MIB's smaller price on heads); edges left dangling by a sample are dropped from
  it (their gradient is zero).
- `Method.HARD_CONCRETE`: Edge Pruning (Bhaskar et al. 2024): hard-concrete L0 gates (Louizos et al. 2018,
  ``beta = 2/3``, stretched to [-0.1, 1.1]), one sample per gate per step shared by the batch; either the
  penalty ``lam * E[L0] / n_edges`` or, with ``target_edges``, Bhaskar et al.'s Lagrangian that drives the
  expected edge count to the target (multipliers trained by gradient ascent, target reached linearly over
  ``warmup`` of the steps).

`learn_masks` returns `MaskScores`: the `EdgeScores` of every edge (its learned inclusion probability, so every
score-based tool (top-k circuits, MIB's faithfulness curves) applies) plus the training curve (``.plot()``).
As in MIB, circuits of each size are read off by ranking one learned mask; `mask_sweep` trains one mask per
penalty weight.

>>> scores = learn_masks(model, circuit_task, MaskConfig(lam=1e-2, steps=30))
>>> circuit = scores.top(20)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import Tensor

from interplab.circuits.circuit import Circuit, DiscoveryTask
from interplab.circuits.eap import EdgeScores, ScoreSign, scores_circuit
from interplab.circuits.engine import EdgeEngine, Spec
from interplab.circuits.graph import NodeKind
from interplab.circuits.masked import MaskedForward, connected
from interplab.model.transformer import Transformer


class Method(str, Enum):
    UGS = "ugs"
    """uniform gradient sampling (Li & Janson 2024), MIB's mask learner"""
    HARD_CONCRETE = "hard_concrete"
    """hard-concrete L0 gates, Edge Pruning (Bhaskar et al. 2024)"""


class Objective(str, Enum):
    KL = "kl"
    """KL(full model || masked model) at ``task.position`` (MIB, Edge Pruning); one position for every row, so
    where the answer's position varies with padding (IOI) use METRIC"""
    METRIC = "metric"
    """the full model's metric minus the masked model's, per example (mean)"""


@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    """How `learn_masks` trains. Defaults follow MIB's UGS run, scaled to small models (see docs/circuits.md)."""

    method: Method = Method.UGS
    """UGS or hard-concrete gates"""
    lam: float = 1e-2
    """sparsity weight: UGS ``lam * sum_e p_e`` (MIB: 1e-3 on GPT-2); hard concrete ``lam * E[L0] / n_edges``"""
    steps: int = 300
    """optimiser steps"""
    batch_size: int = 16
    """clean examples per step"""
    n_samples: int = 4
    """UGS: masks sampled per example per step (MIB: 12)"""
    lr: float | None = None
    """Adam step size (None: 0.05 for UGS, MIB's for lam > 5e-4; 0.1 for hard concrete)"""
    objective: Objective = Objective.KL
    """what the masked model must keep"""
    init: float | None = None
    """initial logit of every edge (None: UGS 1.0 as MIB; hard concrete 3.0, gates open)"""
    target_edges: int | None = None
    """hard concrete: drive the expected number of edges to this with a Lagrangian (Bhaskar et al.)"""
    lr_lagrange: float = 0.8
    """hard concrete with ``target_edges``: step size of the multipliers' gradient ascent (Edge Pruning: 0.8)"""
    warmup: float = 0.8
    """hard concrete with ``target_edges``: fraction of the steps over which the target falls to its value"""
    prune_dangling: bool = True
    """UGS: drop edges that a sampled circuit leaves unconnected to the input or the logits (MIB's UGS)"""
    node_penalty: bool = True
    """UGS: add MIB's price on heads, ``min(lam / 2, 2e-4) * sum_h tanh(2 e_h / n) n / 2`` with ``e_h`` the
    expected edges in and out of head h and n the number of heads (it saturates: a used head costs little more)"""
    clip: float = 5.0
    """gradient-norm clip of the mask parameters"""
    seed: int = 0
    """draws of the masks and the batches"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))
        object.__setattr__(self, "objective", Objective(self.objective))
        for name in ("steps", "batch_size", "n_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"MaskConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lam < 0:
            raise ValueError(f"MaskConfig.lam must be >= 0, got {self.lam}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"MaskConfig.lr must be > 0, got {self.lr}")
        if self.lr_lagrange <= 0:
            raise ValueError(f"MaskConfig.lr_lagrange must be > 0, got {self.lr_lagrange}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"MaskConfig.warmup must be in [0, 1], got {self.warmup}")
        if self.target_edges is not None and self.method is not Method.HARD_CONCRETE:
            raise ValueError("MaskConfig.target_edges needs method='hard_concrete' (UGS has a fixed penalty)")
        if self.target_edges is not None and self.target_edges < 0:
            raise ValueError(f"MaskConfig.target_edges must be >= 0, got {self.target_edges}")

    @property
    def step_size(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.05 if self.method is Method.UGS else 0.1

    @property
    def initial_logit(self) -> float:
        if self.init is not None:
            return self.init
        return 1.0 if self.method is Method.UGS else 3.0


@dataclass(frozen=True, kw_only=True)
class MaskScores(EdgeScores):
    """`EdgeScores` whose scores are learned inclusion probabilities, with the training curve."""

    logits: Tensor
    """the learned parameter of every edge (UGS: logit of p; hard concrete: log alpha)"""
    curve: dict[str, list[float]]
    """per step: ``loss``, ``objective`` (KL or metric loss), ``edges`` (expected number of edges)"""
    config: MaskConfig
    seconds: float
    """wall time of the optimisation"""

    def plot(self):
        """The training curve: the objective and the expected number of edges per step."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        steps = list(range(1, len(self.curve["loss"]) + 1))
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        fig.add_trace(go.Scatter(x=steps, y=self.curve["objective"], name=self.config.objective.value))
        fig.add_trace(go.Scatter(x=steps, y=self.curve["edges"], name="expected edges"), secondary_y=True)
        fig.update_layout(
            title=f"{self.config.method.value} masks, lam={self.config.lam:g}: {len(self.edges)} edges",
            template="plotly_white",
            xaxis_title="step",
        )
        fig.update_yaxes(title_text=self.config.objective.value, secondary_y=False)
        fig.update_yaxes(title_text="expected edges", secondary_y=True)
        return fig


_L, _R, _BETA = -0.1, 1.1, 2.0 / 3.0  # hard-concrete stretch and temperature (Louizos et al. 2018)


def _hard_concrete(log_alpha: Tensor, gen: torch.Generator) -> Tensor:
    u = torch.rand(log_alpha.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / _BETA)
    return (s * (_R - _L) + _L).clamp(0, 1)


def _open_probability(log_alpha: Tensor) -> Tensor:
    """P(gate > 0), the expected L0 of each gate."""
    return torch.sigmoid(log_alpha - _BETA * math.log(-_L / _R))


def _uniform_sample(theta: Tensor, u: Tensor) -> Tensor:
    """UGS: a mask per row of ``u`` [samples n_edges], 0/1 outside a window of width p(1-p) around p."""
    p = torch.sigmoid(theta)
    w = (p * (1 - p)).detach().clamp(min=1e-7)
    p = w * p - (w - 1) * p.detach()  # value p, gradient scaled by w (scale invariance, as in UGS)
    return 1 - ((u - p) / w + 0.5).clamp(0, 1)


def _head_penalty(fwd: MaskedForward, probs: Tensor) -> Tensor:
    """UGS's vertex term: per head, tanh(2 (expected edges in + out) / n_heads_total) * n_heads_total / 2."""
    send, recv = fwd.edge_ends
    per_node = torch.zeros(len(fwd.graph.nodes), dtype=probs.dtype)
    per_node = per_node.index_add(0, send, probs).index_add(0, recv, probs)
    heads = torch.tensor([i for i, n in enumerate(fwd.graph.nodes) if n.kind is NodeKind.HEAD])
    n = heads.numel()
    return (torch.tanh(2 * per_node[heads] / n) * n / 2).sum()


@contextmanager
def _frozen(model: Transformer) -> Iterator[None]:
    """No gradients into the model's weights while the masks learn (restored after)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def learn_masks(
    model: Transformer,
    task: DiscoveryTask,
    config: MaskConfig | None = None,
    *,
    engine: EdgeEngine | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MaskScores:
    """Learn a mask on every edge (see the module docstring); ``progress(step, steps)`` after each step."""
    config = config or MaskConfig()
    fwd = MaskedForward(model, task, engine=engine)
    gen = torch.Generator().manual_seed(config.seed)
    n, n_edges = fwd.n_examples, fwd.n_edges
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        corrupted = fwd.corrupted(torch.arange(n))  # every sender's corrupted value, gathered once
        full = fwd.engine.run(Spec(task.clean))
        full_logp = full[:, task.position].float().log_softmax(-1)
        full_metric = task.metric(full, task.clean).float()
    theta = torch.nn.Parameter(torch.full((n_edges,), config.initial_logit))
    if config.method is Method.HARD_CONCRETE:
        with torch.no_grad():
            theta.add_(0.01 * torch.randn(n_edges, generator=gen))
    opt = torch.optim.AdamW([theta], lr=config.step_size, betas=(0.9, 0.995), weight_decay=0.0)
    lagrange = torch.zeros(2, requires_grad=True)
    opt_lagrange = torch.optim.AdamW([lagrange], lr=config.lr_lagrange, weight_decay=0.0, maximize=True)
    curve: dict[str, list[float]] = {"loss": [], "objective": [], "edges": []}
    batch = min(config.batch_size, n)
    perm, at = torch.randperm(n, generator=gen), 0
    with _frozen(model), _frozen(fwd.model):
        for step in range(config.steps):
            if at + batch > n:
                perm, at = torch.randperm(n, generator=gen), 0
            idx, at = perm[at : at + batch], at + batch
            if config.method is Method.UGS:
                idx = idx.repeat_interleave(config.n_samples)
                mask = _uniform_sample(theta, torch.rand(idx.numel(), n_edges, generator=gen))
                if config.prune_dangling:
                    mask = mask * connected(fwd, mask.detach() > 0).to(mask.dtype)
                expected = torch.sigmoid(theta).sum()
                penalty = config.lam * expected
                if config.node_penalty:
                    penalty = penalty + min(0.5 * config.lam, 2e-4) * _head_penalty(fwd, torch.sigmoid(theta))
            else:
                mask = _hard_concrete(theta, gen)
                expected = _open_probability(theta).sum()
                if config.target_edges is None:
                    penalty = config.lam * expected / n_edges
                else:
                    ramp = (
                        1.0 if config.warmup == 0 else min(1.0, (step + 1) / (config.warmup * config.steps))
                    )
                    target = n_edges + ramp * (config.target_edges - n_edges)
                    gap = (expected - target) / n_edges
                    penalty = lagrange[0] * gap + lagrange[1] * gap**2
            logits = fwd(mask, idx, corrupted=corrupted.select(idx))
            if config.objective is Objective.KL:
                logq = logits[:, task.position].float().log_softmax(-1)
                p = full_logp[idx]
                objective = (p.exp() * (p - logq)).sum(-1).mean()
            else:
                objective = (full_metric[idx] - task.metric(logits, task.clean[idx]).float()).mean()
            loss = objective + penalty
            opt.zero_grad()
            opt_lagrange.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([theta], config.clip)
            opt.step()
            if config.target_edges is not None:
                opt_lagrange.step()
            curve["loss"].append(loss.item())
            curve["objective"].append(objective.item())
            curve["edges"].append(expected.item())
            if progress is not None:
                progress(step + 1, config.steps)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    learned = theta.detach().double()
    probs = torch.sigmoid(learned) if config.method is Method.UGS else _open_probability(learned)
    per_step = batch * (config.n_samples if config.method is Method.UGS else 1)
    return MaskScores(
        edges=fwd.graph.edges,
        scores=probs,
        passes={"forward": config.steps + 1, "backward": config.steps},
        method=config.method.value,
        sign=ScoreSign.IMPORTANCE,
        logits=learned,
        curve=curve,
        config=config,
        seconds=seconds,
        details={
            "method": config.method.value,
            "lam": config.lam,
            "steps": config.steps,
            "rows_per_step": per_step,
            "seconds_per_step": seconds / config.steps,
            "cpu_seconds_per_step": cpu / config.steps,
            "expected_edges": float(probs.sum()),
            "config": {
                f: v.value if isinstance(v, Enum) else v
                for f, v in ((f, getattr(config, f)) for f in config.__dataclass_fields__)
            },
            "curve": curve,
        },
    )


def mask_sweep(
    model: Transformer,
    task: DiscoveryTask,
    lams: Sequence[float],
    config: MaskConfig | None = None,
    *,
    engine: EdgeEngine | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[MaskScores]:
    """One `learn_masks` per sparsity weight in ``lams`` (MIB sweeps 1e-2 ... 1e-7); ``progress`` counts steps
    over the whole sweep."""
    config = config or MaskConfig()
    engine = engine or task.engine(model)
    total = len(lams) * config.steps
    out = []
    for i, lam in enumerate(lams):

        def step(done: int, _: int, i: int = i) -> None:
            if progress is not None:
                progress(i * config.steps + done, total)

        out.append(learn_masks(model, task, replace(config, lam=lam), engine=engine, progress=step))
    return out


def mask_circuit(
    model: Transformer,
    task: DiscoveryTask,
    k: int = 20,
    config: MaskConfig | None = None,
    *,
    engine: EdgeEngine | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Circuit:
    """The ``k`` edges with the largest learned probability (`learn_masks`), as a `Circuit` with its
    faithfulness; ``details`` holds the configuration, the timing and the training curve (`MaskScores.details`)."""
    engine = engine or task.engine(model)
    scores = learn_masks(model, task, config, engine=engine, progress=progress)
    return scores_circuit(engine, task, scores, k)


__all__ = [
    "MaskConfig",
    "MaskScores",
    "MaskedForward",
    "Method",
    "Objective",
    "learn_masks",
    "mask_circuit",
    "mask_sweep",
]
