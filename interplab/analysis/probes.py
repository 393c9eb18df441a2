"""Linear and logistic probes on cached activations, with a train/test split.

>>> tokens = torch.randint(0, model.cfg.d_vocab, (32, 16))
>>> acts = collect_activations(model, tokens, "blocks.0.hook_resid_pre")        # [batch*pos, d_model]
>>> labels = (tokens % 2).flatten()                                             # is the token id odd?
>>> probe = train_probe(acts, labels, ProbeConfig(kind="logistic"))
>>> probe.test_score > 0.9                                                      # accuracy
True
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab import plots
from interplab.hooks.site import Site
from interplab.model import Transformer


class ProbeKind(str, Enum):
    LINEAR = "linear"  # ridge regression onto real targets; score = R^2
    LOGISTIC = "logistic"  # multinomial logistic regression onto class labels; score = accuracy


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """How a probe is fitted."""

    kind: ProbeKind = ProbeKind.LOGISTIC
    """linear (regression, R^2) or logistic (classification, accuracy)"""
    test_fraction: float = 0.2
    """share of examples held out for the test score"""
    l2: float = 1e-4
    """L2 penalty on the weights"""
    max_iter: int = 200
    """LBFGS iterations (logistic probes)"""
    seed: int = 0
    """seed of the train/test split"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ProbeKind(self.kind))
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")


@dataclass(frozen=True)
class ProbeResult:
    """A fitted probe: ``acts @ weight.T + bias``."""

    weight: Tensor
    """[classes or outputs, d]"""
    bias: Tensor
    """[classes or outputs]"""
    kind: ProbeKind
    """linear or logistic"""
    train_score: float
    """accuracy (logistic) or R^2 (linear) on the training split"""
    test_score: float
    """the same on the held-out split"""
    n_train: int
    """training examples"""
    n_test: int
    """held-out examples"""

    @property
    def score_name(self) -> str:
        return "accuracy" if self.kind is ProbeKind.LOGISTIC else "R^2"

    def predict(self, acts: Float[Tensor, "n d"]) -> Tensor:
        out = acts.float() @ self.weight.T + self.bias
        return out.argmax(-1) if self.kind is ProbeKind.LOGISTIC else out.squeeze(-1)

    def direction(self) -> Tensor:
        """A unit direction: the weight of a regression or binary probe (class 1 minus class 0)."""
        w = self.weight[1] - self.weight[0] if self.weight.shape[0] == 2 else self.weight[0]
        return w / w.norm().clamp(min=1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "score": self.score_name,
            "train_score": self.train_score,
            "test_score": self.test_score,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "weight": self.weight.tolist(),
            "bias": self.bias.tolist(),
        }

    def __repr__(self) -> str:
        return (
            f"ProbeResult({self.kind.value}: train {self.score_name} {self.train_score:.3f}, "
            f"test {self.test_score:.3f}; {self.n_train}/{self.n_test} examples)"
        )

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        return plots.bars(
            [self.train_score, self.test_score],
            ["train", "test"],
            y_title=self.score_name,
            title=title or f"{self.kind.value} probe",
        )

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def collect_activations(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    site: str | Site | tuple,
    *,
    positions: Tensor | int | None = None,
) -> Float[Tensor, "n d"]:
    """A site's activations flattened to rows: every (example, position), or one position per example
    (``positions``: an int or [batch]); per-head sites are flattened to one row of all heads."""
    site = Site.parse(site)
    tokens = torch.as_tensor(tokens).to(model.W_E.device)
    _, cache = model.run_with_cache(tokens, [site])
    act = cache[site.name].float()
    if positions is None:
        return act.reshape(act.shape[0] * act.shape[1], -1).cpu()
    pos = torch.as_tensor(positions).reshape(-1).expand(act.shape[0]).to(act.device)
    pos = torch.where(pos < 0, pos + act.shape[1], pos)
    return act[torch.arange(act.shape[0], device=act.device), pos].reshape(act.shape[0], -1).cpu()


def _r2(pred: Tensor, y: Tensor) -> float:
    ss_res = ((pred - y) ** 2).sum()
    ss_tot = ((y - y.mean(0)) ** 2).sum()
    return float(1 - ss_res / ss_tot) if float(ss_tot) > 0 else float("nan")


def train_probe(
    acts: Float[Tensor, "n d"], labels: Tensor, config: ProbeConfig = ProbeConfig()
) -> ProbeResult:
    """Fit a probe on a random train split and score it on the rest."""
    acts = torch.as_tensor(acts).float().cpu()
    labels = torch.as_tensor(labels).cpu()
    if acts.dim() != 2:
        raise ValueError(f"acts must be [n, d], got shape {tuple(acts.shape)}")
    if labels.shape[0] != acts.shape[0]:
        raise ValueError(f"{acts.shape[0]} activation rows but {labels.shape[0]} labels")
    n = acts.shape[0]
    n_test = max(1, round(n * config.test_fraction))
    if n - n_test < 2:
        raise ValueError(
            f"{n} examples are too few for a train/test split with test_fraction={config.test_fraction}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    tr, te = perm[n_test:], perm[:n_test]
    if config.kind is ProbeKind.LINEAR:
        y = labels.float().reshape(n, -1)
        x = torch.cat([acts, torch.ones(n, 1)], dim=1).double()
        xt = x[tr]
        reg = config.l2 * torch.eye(x.shape[1], dtype=torch.float64)
        reg[-1, -1] = 0
        sol = torch.linalg.solve(xt.T @ xt + reg, xt.T @ y[tr].double()).float()  # d+1 outputs
        w, b = sol[:-1].T.contiguous(), sol[-1]
        pred = acts @ w.T + b
        return ProbeResult(
            weight=w,
            bias=b,
            kind=config.kind,
            train_score=_r2(pred[tr], y[tr]),
            test_score=_r2(pred[te], y[te]),
            n_train=len(tr),
            n_test=len(te),
        )
    if labels.dtype.is_floating_point:
        raise TypeError(f"a logistic probe needs integer class labels, got {labels.dtype}")
    y = labels.long().reshape(-1)
    k = int(y.max()) + 1
    mu, sd = acts[tr].mean(0), acts[tr].std(0).clamp(min=1e-6)
    xs = (acts - mu) / sd
    w = torch.zeros(k, acts.shape[1], requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=config.max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs[tr] @ w.T + b, y[tr]) + config.l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # fold the standardisation into the weights so the probe reads raw activations
    w_raw = (w / sd).detach()
    b_raw = (b - (w * (mu / sd)).sum(-1)).detach()
    pred = (acts @ w_raw.T + b_raw).argmax(-1)
    return ProbeResult(
        weight=w_raw,
        bias=b_raw,
        kind=config.kind,
        train_score=float((pred[tr] == y[tr]).float().mean()),
        test_score=float((pred[te] == y[te]).float().mean()),
        n_train=len(tr),
        n_test=len(te),
    )
