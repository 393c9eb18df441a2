"""Modular addition ``a b = -> (a + b) mod p`` in the format of the grokking work (tokens ``[a, b, =]``,
read at the ``=`` position)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.model.config import ModelConfig, Norm
from interplab.tasks.base import Task, TaskBatch, check_n, check_positive


@dataclass(frozen=True, kw_only=True)
class ModAddTask(Task):
    """Tokens ``[a, b, p]`` (``p`` is the ``=`` token); the answer ``(a + b) mod p`` is read at position 2."""

    name: ClassVar[str] = "modadd"

    p: int = 113
    """the modulus; numbers are tokens 0 .. p-1 and ``=`` is token p"""

    def __post_init__(self) -> None:
        check_positive(self, "p", minimum=2)

    @property
    def d_vocab(self) -> int:
        return self.p + 1

    @property
    def d_vocab_out(self) -> int:
        return self.p

    @property
    def seq_len(self) -> int:
        return 3

    @property
    def vocab(self) -> list[str]:
        return [str(i) for i in range(self.p)] + ["="]

    def generate(self, n: int, *, seed: int) -> TaskBatch:
        """``n`` pairs drawn uniformly (with replacement)."""
        check_n(n)
        gen = torch.Generator().manual_seed(seed)
        a = torch.randint(0, self.p, (n,), generator=gen)
        b = torch.randint(0, self.p, (n,), generator=gen)
        return self._batch(a, b)

    def all_pairs(self) -> TaskBatch:
        """Every one of the p^2 pairs, ``a`` major."""
        a, b = torch.meshgrid(torch.arange(self.p), torch.arange(self.p), indexing="ij")
        return self._batch(a.flatten(), b.flatten())

    def split(self, train_fraction: float, *, seed: int) -> tuple[TaskBatch, TaskBatch]:
        """All pairs, shuffled and cut into disjoint (train, test) sets, as in the grokking experiments."""
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
        full = self.all_pairs()
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
        cut = max(1, min(len(full) - 1, round(train_fraction * len(full))))
        return full.select(order[:cut]), full.select(order[cut:])

    def _batch(self, a: Tensor, b: Tensor) -> TaskBatch:
        tokens = torch.stack([a, b, torch.full_like(a, self.p)], dim=1)
        targets = torch.zeros_like(tokens)
        targets[:, 2] = (a + b) % self.p
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, 2] = True
        return TaskBatch(tokens=tokens, targets=targets, loss_mask=loss_mask, meta={"a": a, "b": b})

    def model_config(self, **overrides: Any) -> ModelConfig:
        # the one-layer ReLU model without norms of Nanda et al.'s grokking study
        defaults = dict(
            d_model=128,
            n_layers=1,
            n_heads=4,
            d_mlp=512,
            d_vocab=self.d_vocab,
            d_vocab_out=self.p,
            n_ctx=3,
            act_fn="relu",
            normalization=Norm.NONE,
        )
        return self._config(defaults, overrides)

    def task_metrics(
        self, logits: Float[Tensor, "batch pos d_vocab_out"], batch: TaskBatch
    ) -> dict[str, float]:
        return {}

    def variables(self, tokens: Int[Tensor, "batch pos"]) -> dict[str, Int[Tensor, "batch pos"]]:
        """At the ``=`` position (2), where the answer is read: ``answer`` = (a + b) mod p, ``a`` and ``b``;
        -1 at positions 0 and 1."""
        tokens = self._check_tokens(tokens)
        a, b = tokens[:, 0], tokens[:, 1]
        out = {}
        for name, value in (("answer", (a + b) % self.p), ("a", a), ("b", b)):
            v = torch.full_like(tokens, -1)
            v[:, 2] = value
            out[name] = v
        return out
