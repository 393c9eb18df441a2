"""Metrics: functions of the logits giving one number per example (``f(logits) -> [batch]``).

Any callable ``metric(logits: [batch pos d_vocab]) -> [batch]`` works with patching. The built-in ones
read one position per example, and say so (``positions``), which lets patching unembed only those
positions (``from_final`` takes the logits at the read position, [batch d_vocab]).

>>> metric = LogitDiff(answer=torch.tensor([5]), wrong=torch.tensor([7]))
>>> metric(torch.zeros(1, 3, 10)).shape
torch.Size([1])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

#: a metric: logits [batch pos d_vocab] -> one value per example [batch]
Metric = Callable[[Tensor], Tensor]


def _as_index(value: Tensor | int | list[int], name: str) -> Tensor:
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point:
        raise TypeError(f"{name} must hold integer token ids or positions, got {t.dtype}")
    return t.long().reshape(-1)


class PositionMetric:
    """A metric that reads the logits of one position per example (default: the last)."""

    positions: Tensor | None

    def read_positions(self, batch: int, n_pos: int, device: torch.device) -> Int[Tensor, " batch"]:
        """The position each example is read at (negative positions count from the end)."""
        if self.positions is None:
            return torch.full((batch,), n_pos - 1, device=device, dtype=torch.long)
        pos = self.positions.to(device)
        if pos.numel() == 1:
            pos = pos.expand(batch)
        if pos.numel() != batch:
            raise ValueError(
                f"{type(self).__name__}.positions has {pos.numel()} entries for a batch of {batch}"
            )
        pos = torch.where(pos < 0, pos + n_pos, pos)
        if bool((pos < 0).any()) or bool((pos >= n_pos).any()):
            raise ValueError(
                f"{type(self).__name__}.positions {pos.tolist()} out of range for {n_pos} positions"
            )
        return pos

    def from_final(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        raise NotImplementedError

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        pos = self.read_positions(logits.shape[0], logits.shape[1], logits.device)
        return self.from_final(logits[torch.arange(logits.shape[0], device=logits.device), pos])


def _pick(logits: Tensor, ids: Tensor) -> Tensor:
    ids = ids.to(logits.device)
    if ids.numel() == 1:
        ids = ids.expand(logits.shape[0])
    if ids.numel() != logits.shape[0]:
        raise ValueError(f"token ids have {ids.numel()} entries for a batch of {logits.shape[0]}")
    if bool((ids < 0).any()) or bool((ids >= logits.shape[-1]).any()):
        raise ValueError(f"token ids {ids.tolist()} out of range for d_vocab={logits.shape[-1]}")
    return logits.gather(-1, ids[:, None])[:, 0]


@dataclass(frozen=True, eq=False)
class LogitDiff(PositionMetric):
    """``logit[answer] - logit[wrong]`` at each example's read position."""

    answer: Tensor
    """correct token id per example [batch] (or one id for all)"""
    wrong: Tensor
    """incorrect token id per example [batch] (or one id for all)"""
    positions: Tensor | None = None
    """position read per example [batch] (default: the last)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "answer", _as_index(self.answer, "answer"))
        object.__setattr__(self, "wrong", _as_index(self.wrong, "wrong"))
        if self.positions is not None:
            object.__setattr__(self, "positions", _as_index(self.positions, "positions"))

    def from_final(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        return _pick(logits, self.answer) - _pick(logits, self.wrong)


@dataclass(frozen=True, eq=False)
class NormalizedLogitDiff(PositionMetric):
    """``(LD - LD_corrupted) / (LD_clean - LD_corrupted)``: 0 at the corrupted run, 1 at the clean run.

    Make it with `NormalizedLogitDiff.calibrate`, which computes the two baselines (per example means
    of the batch, as is standard)."""

    logit_diff: LogitDiff
    """the underlying logit difference"""
    clean: float
    """mean logit difference of the clean run"""
    corrupted: float
    """mean logit difference of the corrupted run"""

    def __post_init__(self) -> None:
        if self.clean == self.corrupted:
            raise ValueError(
                f"clean and corrupted logit differences are equal ({self.clean}): cannot normalise"
            )

    @property
    def positions(self) -> Tensor | None:  # type: ignore[override]
        return self.logit_diff.positions

    def from_final(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        return (self.logit_diff.from_final(logits) - self.corrupted) / (self.clean - self.corrupted)

    @classmethod
    def calibrate(
        cls, logit_diff: LogitDiff, clean_logits: Tensor, corrupted_logits: Tensor
    ) -> NormalizedLogitDiff:
        return cls(
            logit_diff=logit_diff,
            clean=float(logit_diff(clean_logits.detach()).mean()),
            corrupted=float(logit_diff(corrupted_logits.detach()).mean()),
        )


@dataclass(frozen=True, eq=False)
class _AnswerMetric(PositionMetric):
    """A metric of the correct token's logit at each example's read position (abstract)."""

    answer: Tensor
    """correct token id per example [batch] (or one id for all)"""
    positions: Tensor | None = None
    """position read per example [batch] (default: the last)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "answer", _as_index(self.answer, "answer"))
        if self.positions is not None:
            object.__setattr__(self, "positions", _as_index(self.positions, "positions"))


@dataclass(frozen=True, eq=False)
class CorrectProb(_AnswerMetric):
    """Probability of the correct token at each example's read position."""

    def from_final(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        return _pick(torch.softmax(logits.float(), dim=-1), self.answer)


@dataclass(frozen=True, eq=False)
class AnswerLoss(_AnswerMetric):
    """Cross-entropy of the correct token at each example's read position."""

    def from_final(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        return -_pick(torch.log_softmax(logits.float(), dim=-1), self.answer)


@dataclass(frozen=True, eq=False)
class SequenceLoss:
    """Mean next-token cross-entropy of each sequence (reads every position)."""

    tokens: Tensor
    """the input tokens [batch pos] (targets are tokens shifted by one)"""
    mask: Tensor | None = None
    """1 for real tokens, 0 for padding [batch pos]"""

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        if logits.shape[:2] != self.tokens.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(self.tokens.shape)}")
        n = logits.shape[0]
        tokens = self.tokens.to(logits.device)
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(n, -1)
        weight = torch.ones_like(loss) if self.mask is None else self.mask[:, 1:].to(loss)
        return (loss * weight).sum(1) / weight.sum(1).clamp(min=1)


def check_metric_output(value: object, batch: int, name: str = "metric") -> Tensor:
    """Raise a clear error unless ``value`` is a tensor with one value per example."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must return a Tensor with one value per example, got {type(value).__name__}")
    if value.shape != (batch,):
        raise ValueError(
            f"{name} must return one value per example, shape ({batch},), got shape {tuple(value.shape)}"
            + ("; return the per-example values, not their mean" if value.dim() == 0 else "")
        )
    return value
