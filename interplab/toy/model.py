"""The ReLU output model of Elhage et al. 2022, "Toy Models of Superposition", many instances in one tensor.

Each instance compresses n sparse features into m < n hidden dimensions and decodes with the transpose:
``h = W x``, ``x' = ReLU(W^T h + b)``. Instances differ in feature probability (sparsity) and importance,
and are trained together (one batched einsum; Adam treats every element independently, so training them
together equals training each alone on the same data).

>>> cfg = ToyConfig(n_features=5, n_hidden=2, n_instances=4, feature_probability=[1.0, 0.3, 0.1, 0.03])
>>> model = ToyModel(cfg)
>>> history = train_toy(model, steps=200)
>>> history[-1]["loss"] < history[0]["loss"]
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """Shape and data distribution of a batch of toy models."""

    n_features: int
    """n: number of sparse input features"""
    n_hidden: int
    """m: hidden dimensions (superposition when m < n)"""
    n_instances: int = 1
    """models trained side by side"""
    feature_probability: float | Sequence[float] | Sequence[Sequence[float]] = 0.05
    """chance a feature is non-zero: a scalar, one per instance, or [n_instances][n_features]"""
    importance: float | Sequence[float] | Sequence[Sequence[float]] = 1.0
    """loss weight per feature: a scalar (decay base: feature i weighs base**i), one per feature, or
    [n_instances][n_features]"""

    def __post_init__(self) -> None:
        for name in ("n_features", "n_hidden", "n_instances"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        p = self.probability_tensor()
        if ((p <= 0) | (p > 1)).any():
            raise ValueError(f"feature_probability must be in (0, 1], got {self.feature_probability!r}")
        self.importance_tensor()

    def probability_tensor(self) -> Float[Tensor, "n_instances n_features"]:
        return _broadcast(
            self.feature_probability, self.n_instances, self.n_features, "feature_probability", per="instance"
        )

    def importance_tensor(self) -> Float[Tensor, "n_instances n_features"]:
        if isinstance(self.importance, (int, float)):
            return (
                (float(self.importance) ** torch.arange(self.n_features).float())
                .expand(self.n_instances, -1)
                .clone()
            )
        return _broadcast(self.importance, self.n_instances, self.n_features, "importance", per="feature")


def _broadcast(value, n_inst: int, n_feat: int, name: str, per: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0:
        return t.expand(n_inst, n_feat).clone()
    if t.ndim == 1:
        if per == "instance" and t.shape[0] == n_inst:
            return t[:, None].expand(n_inst, n_feat).clone()
        if per == "feature" and t.shape[0] == n_feat:
            return t[None].expand(n_inst, n_feat).clone()
    if t.ndim == 2 and tuple(t.shape) == (n_inst, n_feat):
        return t.clone()
    raise ValueError(
        f"{name} has shape {tuple(t.shape)}; valid: a scalar, [{n_inst if per == 'instance' else n_feat}] "
        f"or [{n_inst}, {n_feat}]"
    )


class ToyModel(nn.Module):
    """``n_instances`` ReLU output models: W [instance, n_hidden, n_features], b_final [instance, n_features]."""

    probability: Tensor  # buffers [instance n_features], registered in __init__
    importance: Tensor

    def __init__(self, cfg: ToyConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)  # never the global RNG: same config + seed, same model
        w = torch.empty(cfg.n_instances, cfg.n_hidden, cfg.n_features)
        bound = (6 / (cfg.n_hidden + cfg.n_features)) ** 0.5  # xavier uniform
        self.W = nn.Parameter(w.uniform_(-bound, bound, generator=g))
        self.b_final = nn.Parameter(torch.zeros(cfg.n_instances, cfg.n_features))
        self.register_buffer("probability", cfg.probability_tensor())
        self.register_buffer("importance", cfg.importance_tensor())

    def hidden(
        self, x: Float[Tensor, "batch instance n_features"]
    ) -> Float[Tensor, "batch instance n_hidden"]:
        return torch.bmm(x.transpose(0, 1), self.W.transpose(1, 2)).transpose(0, 1)  # bmm: fast for tiny m, n

    def forward(
        self, x: Float[Tensor, "batch instance n_features"]
    ) -> Float[Tensor, "batch instance n_features"]:
        h = torch.bmm(x.transpose(0, 1), self.W.transpose(1, 2))  # [instance, batch, m]
        return (torch.bmm(h, self.W).transpose(0, 1) + self.b_final).relu()

    def generate_batch(
        self, batch: int, generator: torch.Generator | None = None
    ) -> Float[Tensor, "batch instance n_features"]:
        """Each feature is uniform in [0, 1] with its instance's probability, else 0."""
        shape = (batch, self.cfg.n_instances, self.cfg.n_features)
        values = torch.rand(shape, generator=generator)
        return torch.where(torch.rand(shape, generator=generator) < self.probability, values, 0.0)

    def feature_directions(self, instance: int = 0) -> Float[Tensor, "n_features n_hidden"]:
        """The true feature directions of one instance as rows: ``W[instance].T`` (feature i is written to
        the hidden layer along column i of W)."""
        if not 0 <= instance < self.cfg.n_instances:
            raise ValueError(f"instance {instance} out of range: the model has {self.cfg.n_instances}")
        return self.W.detach()[instance].T

    def loss_per_instance(self, x: Tensor) -> Float[Tensor, " instance"]:
        """Importance-weighted squared error, mean over batch and features."""
        return (self.importance * (self(x) - x).pow(2)).mean(dim=(0, 2))


def train_toy(
    model: ToyModel,
    *,
    steps: int = 5000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    data: Callable[[int], Tensor] | None = None,
    log_every: int = 100,
) -> list[dict[str, int | list[float]]]:
    """Train every instance at once with Adam (loss = sum of per-instance losses, so instances do not
    interact). ``data(step)`` may supply batches; by default they are drawn from the model's distribution.
    Returns one row per ``log_every`` steps with the mean loss per instance."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history: list[dict[str, int | list[float]]] = []
    for step in range(steps):
        x = data(step) if data is not None else model.generate_batch(batch_size, g)
        loss = model.loss_per_instance(x)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if (step + 1) % log_every == 0 or step == steps - 1:
            history.append({"step": step + 1, "loss": loss.detach().tolist()})
    return history
