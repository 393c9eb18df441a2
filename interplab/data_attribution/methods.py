"""Attribution methods behind one convention: a score per training example equal to the (predicted)
change of the target caused by training on that example. Positive = the example pushed the target up.

All methods take gradient features (possibly projected, see `Projector`) and return a [n_train] tensor
(or [n_target, n_train] when several targets are scored at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class Method(str, Enum):
    GRAD_DOT = "grad_dot"
    GRAD_COS = "grad_cos"
    TRACIN = "tracin"
    TRAK = "trak"
    INFLUENCE = "influence"
    TRAJECTORY = "trajectory"


def _2d(t: Tensor) -> Tensor:
    return t[None] if t.dim() == 1 else t


def _squeeze(out: Tensor, target: Tensor) -> Tensor:
    return out[0] if target.dim() == 1 else out


def grad_dot(train: Tensor, target: Tensor, lr: float = 1.0) -> Tensor:
    """-lr <grad target, grad loss_i>: the first-order change of the target after one SGD step on example i."""
    return _squeeze(-lr * _2d(target).float() @ train.float().T, target)


def grad_cos(train: Tensor, target: Tensor) -> Tensor:
    """-cos(grad target, grad loss_i): direction only (ignores gradient norms)."""
    t = _2d(target).float()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)
    g = train.float() / train.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    return _squeeze(-(t @ g.T), target)


@dataclass(frozen=True)
class CheckpointGrads:
    """Gradient features at one checkpoint: the training examples', the target's, and the learning rate there."""

    step: int
    lr: float
    train: Tensor  # [n_train, k]
    target: Tensor  # [k] or [n_target, k]


def tracin(checkpoints: Sequence[CheckpointGrads]) -> Tensor:
    """TracIn-CP (Pruthi et al. 2020): sum over checkpoints of -lr_c <grad target_c, grad loss_i,c>."""
    if not checkpoints:
        raise ValueError("tracin needs at least one checkpoint")
    return sum(grad_dot(c.train, c.target, c.lr) for c in checkpoints)  # type: ignore[return-value]


def tracin_per_checkpoint(checkpoints: Sequence[CheckpointGrads]) -> Tensor:
    """[n_checkpoints, n_train]: each checkpoint's TracIn term (attribution mass over training time)."""
    return torch.stack([grad_dot(c.train, c.target, c.lr) for c in checkpoints])


def trak(
    train: Tensor,
    target: Tensor,
    *,
    damping: float = 1e-3,
    ridge: float = 0.0,
    weights: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """TRAK (Park et al. 2023) on projected gradient features Phi [n, k]:
    score_i = -scale * phi_target^T (Phi^T Phi + (ridge + damping * mean_diag) I)^-1 phi_i * w_i,
    with w_i = 1 - p_i for classification (pass ``weights``), else 1. ``ridge`` is the model's own L2
    regularisation summed over the training set (n * l2) when it has one. Average scores over checkpoints or
    independently trained models (an ensemble) with `ensemble`."""
    phi = train.double()
    kernel = phi.T @ phi
    lam = ridge + damping * float(kernel.diagonal().mean().clamp_min(1e-30))
    kernel += lam * torch.eye(kernel.shape[0], dtype=kernel.dtype)
    solved = torch.linalg.solve(kernel, _2d(target).double().T).T  # [n_target, k]
    scores = -scale * (solved @ phi.T)
    if weights is not None:
        scores = scores * weights.double()[None]
    return _squeeze(scores.float(), target)


def ensemble(scores: Sequence[Tensor]) -> Tensor:
    """Mean of several score tensors (TRAK over checkpoints or models)."""
    return torch.stack(list(scores)).mean(0)


def influence(
    hessian: Tensor, train: Tensor, target: Tensor, *, n_train: int | None = None, damping: float = 0.0
) -> Tensor:
    """Influence functions (Koh & Liang 2017) with an exact Hessian of the mean training loss, for small models:
    adding example i with weight 1/n moves the parameters by -H^-1 g_i / n, so the target changes by
    -g_target^T H^-1 g_i / n."""
    n = n_train if n_train is not None else train.shape[0]
    h = hessian.double() + damping * torch.eye(hessian.shape[0], dtype=torch.float64)
    solved = torch.linalg.solve(h, _2d(target).double().T).T
    return _squeeze((-(solved @ train.double().T) / n).float(), target)


@dataclass(frozen=True)
class StepUpdates:
    """What one optimiser step did, per example: the projected update directions of the examples in its batch."""

    step: int
    lr: float
    example_ids: Tensor  # [batch] long
    updates: Tensor  # [batch, k]: per-example gradient (preconditioned for Adam), / batch size
    target: Tensor  # [k]: the target's gradient at this step


def trajectory(steps: Sequence[StepUpdates], n_examples: int) -> tuple[Tensor, Tensor]:
    """The first-order change of the target caused by each example's updates, summed over a window of steps:
    score_i = sum_t -lr_t <grad target_t, update_i,t>. Returns (scores [n_examples], per-step mass [n_steps])
    where per-step mass is the summed absolute contribution of each step."""
    scores = torch.zeros(n_examples, dtype=torch.float64)
    mass = torch.zeros(len(steps), dtype=torch.float64)
    for t, s in enumerate(steps):
        if int(s.example_ids.max()) >= n_examples or int(s.example_ids.min()) < 0:
            raise ValueError(f"step {s.step}: example id out of range 0..{n_examples - 1}")
        contrib = -s.lr * (s.updates.double() @ s.target.double())
        scores.index_add_(0, s.example_ids.long(), contrib)
        mass[t] = contrib.abs().sum()
    return scores.float(), mass.float()


def formation_window(
    steps: Sequence[int], values: Sequence[float], lo: float = 0.1, hi: float = 0.9
) -> tuple[int, int]:
    """The steps over which a mechanism forms: from the last step still below ``lo`` of the score's total rise to
    the first step above ``hi`` of it (e.g. the induction phase change). Needs a rising score."""
    if len(steps) != len(values) or len(steps) < 2:
        raise ValueError(f"need matching steps and values (at least 2), got {len(steps)} and {len(values)}")
    order = sorted(range(len(steps)), key=lambda i: steps[i])
    s = [steps[i] for i in order]
    v = [values[i] for i in order]
    base, peak = v[0], max(v)
    if peak - base <= 0:
        raise ValueError(f"the score never rises above its first value {base:.4g}: no formation to attribute")
    lo_v, hi_v = base + lo * (peak - base), base + hi * (peak - base)
    first_hi = next(i for i, x in enumerate(v) if x >= hi_v)
    last_lo = max((i for i in range(first_hi + 1) if v[i] <= lo_v), default=0)
    return s[last_lo], s[first_hi]
