"""The `Task` contract: a generator of inputs with exact labels, its loss positions, loss, metrics and a
sensible small model; plus the registry that lets new tasks plug in by subclassing.

>>> from interplab.tasks import get_task
>>> task = get_task("induction", d_vocab=32, half_len=8)
>>> batch = task.generate(4, seed=0)
>>> batch.tokens.shape, int(batch.loss_mask.sum())
(torch.Size([4, 17]), 28)
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.model.config import ModelConfig

_REGISTRY: dict[str, type[Task]] = {}


@dataclass(frozen=True, kw_only=True)
class TaskBatch:
    """``n`` examples of a task. Loss and metrics are read where ``loss_mask`` is True."""

    tokens: Int[Tensor, "batch pos"]
    """input token ids"""
    targets: Int[Tensor, "batch pos"]
    """the label at each position (next token, or a class label at the read position)"""
    loss_mask: Bool[Tensor, "batch pos"]
    """positions where the loss and the metrics are read"""
    attention_mask: Bool[Tensor, "batch pos"] | None = None
    """real tokens (True) and padding (False); None when nothing is padded"""
    meta: dict[str, Any] = field(default_factory=dict)
    """task-specific extras: tensors or lists with one entry per example (e.g. corrupted tokens, features)"""

    def __post_init__(self) -> None:
        shape = tuple(self.tokens.shape)
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch pos], got shape {shape}")
        for name in ("targets", "loss_mask", "attention_mask"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, tokens {shape}")
        if self.loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be bool, got {self.loss_mask.dtype}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: Tensor | slice | Sequence[int]) -> TaskBatch:
        """The examples at ``index`` (a slice, index list or boolean mask), meta included."""
        n = len(self)
        if isinstance(index, slice):
            rows = torch.arange(n)[index]
        else:
            rows = torch.as_tensor(index)
            if rows.dtype == torch.bool:
                rows = rows.nonzero().flatten()
        rows = rows.long()

        def pick(value: Any) -> Any:
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n:
                return value[rows.to(value.device)]
            if isinstance(value, list) and len(value) == n:
                return [value[i] for i in rows.tolist()]
            return value

        return TaskBatch(
            tokens=pick(self.tokens),
            targets=pick(self.targets),
            loss_mask=pick(self.loss_mask),
            attention_mask=None if self.attention_mask is None else pick(self.attention_mask),
            meta={k: pick(v) for k, v in self.meta.items()},
        )

    def to(self, device: torch.device | str) -> TaskBatch:
        """A copy with every tensor (meta included) on ``device``."""

        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, Tensor) else value

        return TaskBatch(
            tokens=move(self.tokens),
            targets=move(self.targets),
            loss_mask=move(self.loss_mask),
            attention_mask=move(self.attention_mask),
            meta={k: move(v) for k, v in self.meta.items()},
        )

    def __repr__(self) -> str:
        padded = "" if self.attention_mask is None else ", padded"
        return (
            f"TaskBatch(n={len(self)}, pos={self.tokens.shape[1]}, loss positions={int(self.loss_mask.sum())}"
            f"{padded}, meta={sorted(self.meta)})"
        )


class Task(ABC):
    """An algorithmic task. Subclasses are frozen keyword-only dataclasses with a ``name`` class attribute;
    defining one registers it (``get_task(name)``), and a second class with the same name is refused.

    A subclass implements ``generate``, ``model_config``, ``task_metrics`` and the ``d_vocab`` / ``seq_len``
    / ``vocab`` properties (or fields); ``loss`` and ``metrics`` are shared."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return  # an abstract intermediate class
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__}.name must be a non-empty str, got {name!r}")
        previous = _REGISTRY.get(name)
        if previous is not None and (previous.__module__, previous.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ValueError(
                f"task name {name!r} is already registered by {previous.__module__}.{previous.__qualname__}"
            )
        _REGISTRY[name] = cls

    # ---- what a task defines -------------------------------------------------------------------
    @property
    @abstractmethod
    def d_vocab(self) -> int:
        """input vocabulary size"""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """tokens per example"""

    @property
    @abstractmethod
    def vocab(self) -> list[str]:
        """the string of each input token id (for plots)"""

    @property
    def d_vocab_out(self) -> int:
        """size of the model's output (a classifier has fewer outputs than inputs)"""
        return self.d_vocab

    @abstractmethod
    def generate(self, n: int, *, seed: int) -> TaskBatch:
        """``n`` examples, a deterministic function of (task parameters, n, seed)."""

    @abstractmethod
    def model_config(self, **overrides: Any) -> ModelConfig:
        """A small model that can learn the task; ``overrides`` replace any ModelConfig field."""

    @abstractmethod
    def task_metrics(
        self, logits: Float[Tensor, "batch pos d_vocab_out"], batch: TaskBatch
    ) -> dict[str, float]:
        """Metrics beyond loss and accuracy (e.g. IOI's logit difference)."""

    def variables(self, tokens: Int[Tensor, "batch pos"]) -> dict[str, Int[Tensor, "batch pos"]]:
        """The task's ground-truth variables at every position of inputs ``tokens`` (examples of this task):
        {name: [batch pos] integer labels, -1 where the variable is not defined}, the labels that probes of
        a model's activations (e.g. `interplab.sae.bench`) read. A task without any returns {} (the
        default)."""
        return {}

    def variable_names(self) -> list[str]:
        """The names `variables` returns (read from one generated example)."""
        return list(self.variables(self.generate(1, seed=0).tokens))

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"task {self.name!r} examples are [batch, {self.seq_len}] token ids, got shape {tuple(tokens.shape)}"
            )
        return tokens.long()

    # ---- shared --------------------------------------------------------------------------------
    def loss(self, logits: Float[Tensor, "batch pos d_vocab_out"], batch: TaskBatch) -> Float[Tensor, ""]:
        """Mean cross-entropy over the positions in ``batch.loss_mask``."""
        picked, targets = self._read(logits, batch)
        return F.cross_entropy(picked.float(), targets)

    def metrics(self, logits: Float[Tensor, "batch pos d_vocab_out"], batch: TaskBatch) -> dict[str, float]:
        """``loss``, ``accuracy`` (argmax = target over the loss positions) and the task's own metrics."""
        with torch.no_grad():
            picked, targets = self._read(logits, batch)
            out = {
                "loss": float(F.cross_entropy(picked.float(), targets)),
                "accuracy": float((picked.argmax(-1) == targets).float().mean()),
            }
            out.update(self.task_metrics(logits, batch))
        return out

    def _read(self, logits: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        expected = (*batch.tokens.shape, self.d_vocab_out)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"logits have shape {tuple(logits.shape)}; task {self.name!r} expects {expected} "
                "[batch pos d_vocab_out]"
            )
        mask = batch.loss_mask.to(logits.device)
        return logits[mask], batch.targets.to(logits.device)[mask]

    def _config(self, defaults: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(known)}")
        return ModelConfig(**{**defaults, "name": self.name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The task's name and parameters (JSON-ready); ``task_from_dict`` is the inverse."""
        out: dict[str, Any] = {"name": self.name}
        if dataclasses.is_dataclass(self):
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def list_tasks() -> list[str]:
    """Names of every registered task, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str, **kwargs: Any) -> Task:
    """The task called ``name``, built with ``kwargs`` (its parameters)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(_REGISTRY))}")
    if dataclasses.is_dataclass(cls):
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise TypeError(f"task {name!r} has no parameters {unknown}; valid parameters: {sorted(valid)}")
    return cls(**kwargs)


def task_from_dict(data: dict[str, Any]) -> Task:
    """Inverse of ``Task.to_dict``."""
    data = dict(data)
    if "name" not in data:
        raise ValueError(f"a task dict needs a 'name', got keys {sorted(data)}")
    name = data.pop("name")
    return get_task(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")


def check_positive(obj: object, *names: str, minimum: int = 1) -> None:
    """Raise naming the field if any of ``names`` is not an int >= ``minimum``."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def next_token_targets(tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """``targets[:, i] = tokens[:, i + 1]``; the last position gets 0 (never in a loss mask)."""
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    return targets
