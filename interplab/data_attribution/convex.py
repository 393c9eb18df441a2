"""A small convex problem with known answers for evaluating attribution: softmax regression on sklearn's bundled
8x8 digits. `lds_experiment` retrains models on random subsets and scores every method by its LDS."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian

from interplab.data_attribution import methods
from interplab.data_attribution.evaluate import lds
from interplab.data_attribution.params import param_group
from interplab.data_attribution.per_example import objective_grad, per_example_grads
from interplab.data_attribution.projection import ProjectionKind, Projector


def digits(n_train: int = 600, n_test: int = 64, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test) from sklearn's bundled digits (no download), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if n_train + n_test > len(y):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(y)} digits")
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


class SoftmaxRegression(nn.Module):
    def __init__(self, d_in: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, n_classes, dtype=torch.float64)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def example_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of one example (x [d_in], y [])."""
    return F.cross_entropy(model(x[None]), y[None])


def example_margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """TRAK's output function for classification: log(p_y / (1 - p_y)) of one example."""
    logits = model(x[None])[0]
    is_y = torch.arange(logits.shape[-1]) == y
    return (logits * is_y).sum() - torch.logsumexp(logits.masked_fill(is_y, float("-inf")), dim=0)


def fit(x: Tensor, y: Tensor, *, l2: float = 1e-2, iters: int = 200) -> SoftmaxRegression:
    """Minimise mean cross-entropy + l2/2 ||W||^2 exactly (full-batch L-BFGS, float64)."""
    model = SoftmaxRegression(x.shape[1])
    opt = torch.optim.LBFGS(
        model.parameters(),
        max_iter=iters,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * l2 * model.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def hessian_of_mean_loss(model: SoftmaxRegression, x: Tensor, y: Tensor, l2: float) -> Tensor:
    """Exact Hessian [p, p] of the training objective (weight then bias, flattened as `param_group(model, 'all')`)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def objective(v: Tensor) -> Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return (
            F.cross_entropy(functional_call(model, parts, (x,)), y)
            + 0.5 * l2 * parts["linear.weight"].pow(2).sum()
        )

    return hessian(objective)(flat)


@dataclass(frozen=True)
class LDSResult:
    """LDS per method (mean over test targets) with the per-target values."""

    lds: dict[str, float]
    per_target: dict[str, list[float]] = field(repr=False)
    n_models: int
    n_train: int
    n_test: int

    def to_dict(self) -> dict:
        return {"lds": self.lds, "n_models": self.n_models, "n_train": self.n_train, "n_test": self.n_test}


def lds_experiment(
    *,
    n_train: int = 600,
    n_test: int = 64,
    n_models: int = 50,
    fraction: float = 0.5,
    l2: float = 1e-2,
    proj_dim: int = 256,
    tracin_steps: int = 20,
    seed: int = 0,
) -> LDSResult:
    """Score influence, TRAK, TracIn, grad-dot and grad-cos by LDS on digits softmax regression."""
    x, y, xt, yt = digits(n_train, n_test, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    subsets = torch.rand(n_models, n_train, generator=gen) < fraction
    actual = torch.stack(
        [_test_losses(fit(x[s], y[s], l2=l2), xt, yt) for s in subsets]
    )  # [n_models, n_test]

    full = fit(x, y, l2=l2)
    group = param_group(full, "all")
    train_g = per_example_grads(full, example_loss, (x, y), group)
    test_g = per_example_grads(full, example_loss, (xt, yt), group)
    proj = Projector(d_in=group.numel, dim=proj_dim, seed=seed, kind=ProjectionKind.GAUSSIAN)
    scores: dict[str, Tensor] = {
        "influence": methods.influence(hessian_of_mean_loss(full, x, y, l2), train_g, test_g),
        "grad_dot": methods.grad_dot(train_g, test_g),
        "grad_cos": methods.grad_cos(train_g, test_g),
    }
    # TRAK: projected margin gradients, loss-reweighted by (1 - p), ensembled over models trained on random halves
    trak_scores = []
    for _ in range(5):
        sub = torch.rand(n_train, generator=gen) < fraction
        model_m = fit(x[sub], y[sub], l2=l2)
        phi = per_example_grads(model_m, example_margin, (x, y), group, transform=proj.project)
        phi_t = per_example_grads(model_m, example_margin, (xt, yt), group, transform=proj.project)
        with torch.no_grad():
            p_train = F.softmax(model_m(x), -1).gather(1, y[:, None])[:, 0]
            p_test = F.softmax(model_m(xt), -1).gather(1, yt[:, None])[:, 0]
        # training on i raises margins along (1 - p_i) phi_i (trak() returns minus that change); the test
        # loss falls by (1 - p_test) per unit of test margin, so the two signs cancel
        trak_scores.append(
            methods.trak(phi, phi_t, damping=0.0, ridge=l2 * n_train, weights=1 - p_train)
            * (1 - p_test)[:, None]
        )
    scores["trak"] = methods.ensemble(trak_scores)
    # TracIn over checkpoints of a gradient-descent trajectory on the full data
    scores["tracin"] = methods.tracin(
        _gd_checkpoints(x, y, xt, yt, l2=l2, steps=tracin_steps, group_spec="all")
    )
    per_target = {k: lds(v, subsets, actual).tolist() for k, v in scores.items()}
    return LDSResult(
        {k: float(torch.tensor(v).mean()) for k, v in per_target.items()},
        per_target,
        n_models,
        n_train,
        n_test,
    )


def _test_losses(model: nn.Module, xt: Tensor, yt: Tensor) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(xt), yt, reduction="none")


def _gd_checkpoints(
    x: Tensor, y: Tensor, xt: Tensor, yt: Tensor, *, l2: float, steps: int, group_spec: str, lr: float = 2.0
) -> list[methods.CheckpointGrads]:
    model = SoftmaxRegression(x.shape[1])
    group = param_group(model, group_spec)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        out.append(
            methods.CheckpointGrads(
                step,
                lr / len(y),
                per_example_grads(model, example_loss, (x, y), group),
                per_example_grads(model, example_loss, (xt, yt), group),
            )
        )
        opt.zero_grad()
        (F.cross_entropy(model(x), y) + 0.5 * l2 * model.linear.weight.pow(2).sum()).backward()
        opt.step()
    return out


__all__ = ["LDSResult", "SoftmaxRegression", "digits", "fit", "lds_experiment", "objective_grad"]
