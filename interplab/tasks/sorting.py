"""Sorting: ``x_1 .. x_k [sep] y_1 .. y_k`` where ``y = sorted(x)``; next-token loss on the sorted half."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.model.config import ModelConfig
from interplab.tasks.base import Task, TaskBatch, check_n, check_positive, next_token_targets


@dataclass(frozen=True, kw_only=True)
class SortingTask(Task):
    """Values are tokens ``0 .. n_values-1``, the separator is token ``n_values``. The loss positions are the
    separator and the first ``list_len - 1`` sorted tokens (each predicts the next sorted value)."""

    name: ClassVar[str] = "sorting"

    n_values: int = 64
    """how many distinct values a list element can take"""
    list_len: int = 10
    """elements per list"""
    allow_duplicates: bool = True
    """lists may repeat a value (if False, each list has distinct values; needs n_values >= list_len)"""

    def __post_init__(self) -> None:
        check_positive(self, "n_values", minimum=2)
        check_positive(self, "list_len", minimum=2)
        if not self.allow_duplicates and self.n_values < self.list_len:
            raise ValueError(
                f"allow_duplicates=False needs n_values >= list_len, got {self.n_values} < {self.list_len}"
            )

    @property
    def sep(self) -> int:
        return self.n_values

    @property
    def d_vocab(self) -> int:
        return self.n_values + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.list_len + 1

    @property
    def vocab(self) -> list[str]:
        return [str(i) for i in range(self.n_values)] + ["[sep]"]

    def generate(self, n: int, *, seed: int) -> TaskBatch:
        check_n(n)
        gen = torch.Generator().manual_seed(seed)
        if self.allow_duplicates:
            x = torch.randint(0, self.n_values, (n, self.list_len), generator=gen)
        else:
            x = torch.rand(n, self.n_values, generator=gen).argsort(dim=1)[:, : self.list_len]
        y = x.sort(dim=1).values
        tokens = torch.cat([x, torch.full((n, 1), self.sep), y], dim=1)
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, self.list_len : 2 * self.list_len] = True
        return TaskBatch(tokens=tokens, targets=next_token_targets(tokens), loss_mask=loss_mask)

    def model_config(self, **overrides: Any) -> ModelConfig:
        defaults = dict(d_model=128, n_layers=2, n_heads=4, d_vocab=self.d_vocab, n_ctx=self.seq_len)
        return self._config(defaults, overrides)

    def task_metrics(
        self, logits: Float[Tensor, "batch pos d_vocab_out"], batch: TaskBatch
    ) -> dict[str, float]:
        mask = batch.loss_mask.to(logits.device)
        right = (logits.argmax(-1) == batch.targets.to(logits.device)) | ~mask
        return {"sequence_accuracy": float(right.all(dim=1).float().mean())}

    def variables(self, tokens: Int[Tensor, "batch pos"]) -> dict[str, Int[Tensor, "batch pos"]]:
        """``segment``: 0 on the input list, 1 on the separator, 2 on the sorted list; ``duplicate``: 1 where
        the token's value occurs more than once in the example's list, 0 where once, -1 on the separator."""
        tokens = self._check_tokens(tokens)
        n = self.list_len
        segment = torch.zeros_like(tokens)
        segment[:, n] = 1
        segment[:, n + 1 :] = 2
        x = tokens[:, :n]
        count = (tokens[:, :, None] == x[:, None, :]).sum(-1)  # occurrences of each token's value in the list
        duplicate = (count > 1).long()
        duplicate[:, n] = -1
        return {"segment": segment, "duplicate": duplicate}
