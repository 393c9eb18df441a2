"""Repeated random tokens: ``[bos] + r + r``. The second copy of ``r`` is predictable only by induction
(find the earlier occurrence of the current token, copy what followed it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from interplab.model.config import ModelConfig
from interplab.tasks.base import Task, TaskBatch, check_n, check_positive, next_token_targets

BOS = 0


@dataclass(frozen=True, kw_only=True)
class InductionTask(Task):
    """``[bos] + r + r`` with ``r`` uniform over tokens ``1 .. d_vocab-1``; next-token loss on the second
    copy from its second token on (the first token of the repeat is not predictable)."""

    name: ClassVar[str] = "induction"

    d_vocab: int = 64
    """vocabulary size, the bos token 0 included"""
    half_len: int = 32
    """length of the random sequence r (the example has 1 + 2 * half_len tokens)"""

    def __post_init__(self) -> None:
        check_positive(self, "d_vocab", minimum=3)
        check_positive(self, "half_len", minimum=2)

    @property
    def seq_len(self) -> int:
        return 1 + 2 * self.half_len

    @property
    def vocab(self) -> list[str]:
        return ["[bos]"] + [f"t{i}" for i in range(1, self.d_vocab)]

    def generate(self, n: int, *, seed: int) -> TaskBatch:
        check_n(n)
        gen = torch.Generator().manual_seed(seed)
        r = torch.randint(1, self.d_vocab, (n, self.half_len), generator=gen)
        tokens = torch.cat([torch.full((n, 1), BOS), r, r], dim=1)
        h = self.half_len
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, h + 1 : 2 * h] = True  # predicts tokens h+2 .. 2h: the repeat after its first token
        first_half = torch.zeros_like(loss_mask)
        first_half[:, 1:h] = True  # predicts tokens 2 .. h: unpredictable random tokens
        return TaskBatch(
            tokens=tokens,
            targets=next_token_targets(tokens),
            loss_mask=loss_mask,
            meta={"first_half_mask": first_half},
        )

    def model_config(self, **overrides: Any) -> ModelConfig:
        defaults = dict(
            d_model=64, n_layers=2, n_heads=4, d_vocab=self.d_vocab, n_ctx=self.seq_len, attn_only=True
        )
        return self._config(defaults, overrides)

    def task_metrics(
        self, logits: Float[Tensor, "batch pos d_vocab_out"], batch: TaskBatch
    ) -> dict[str, float]:
        first = batch.meta["first_half_mask"].to(logits.device)
        targets = batch.targets.to(logits.device)
        first_loss = float(F.cross_entropy(logits[first].float(), targets[first]))
        repeat = batch.loss_mask.to(logits.device)
        repeat_loss = float(F.cross_entropy(logits[repeat].float(), targets[repeat]))
        return {"first_half_loss": first_loss, "in_context_gain": first_loss - repeat_loss}

    def variables(self, tokens: Int[Tensor, "batch pos"]) -> dict[str, Int[Tensor, "batch pos"]]:
        """``repeat``: 1 on the second copy of ``r`` (positions h+1 .. 2h, each a copy of the token h earlier),
        0 elsewhere; ``seen_before``: 1 where the token already occurred at an earlier position (always on the
        second copy, by chance in the first), 0 elsewhere (the bos position included)."""
        tokens = self._check_tokens(tokens)
        repeat = torch.zeros_like(tokens)
        repeat[:, self.half_len + 1 :] = 1
        earlier = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril(
            -1
        )  # [pos, earlier pos]
        same = tokens[:, :, None] == tokens[:, None, :]
        seen = (same & earlier).any(-1) & (tokens != BOS)
        return {"repeat": repeat, "seen_before": seen.long()}
