"""Named tasks for the ``scrub`` and ``discover`` commands, and the bridge from a scrubbing task to discovery.

- ``parens``: the REMIX paren balancer data set (``--data`` = the fixture folder);
- ``induction``: sequences of distinct tokens whose last token repeats an earlier one (the label is the token
  that followed it), drawn from the model's first ``d_vocab`` ids, at most ``n_ctx`` long.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import torch

from interplab.circuits.circuit import DiscoveryTask
from interplab.circuits.planted import induction_data
from interplab.model.transformer import Transformer
from interplab.scrub.algorithm import ScrubTask
from interplab.scrub.induction import induction_task
from interplab.scrub.parens import paren_task


class TaskName(str, Enum):
    PARENS = "parens"
    INDUCTION = "induction"


def build_task(
    name: TaskName | str,
    model: Transformer,
    *,
    data: str | Path | None = None,
    n_rows: int = 4000,
    seed: int = 0,
    vocab: int = 16,
    length: int = 10,
) -> ScrubTask:
    """The `ScrubTask` called ``name`` for ``model``."""
    try:
        name = TaskName(name)
    except ValueError:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(t.value for t in TaskName)}") from None
    if name is TaskName.PARENS:
        if data is None:
            raise ValueError("task 'parens' needs --data: the paren_balancer fixture folder")
        return paren_task(data)
    vocab = min(vocab, model.cfg.d_vocab)
    length = min(length, model.cfg.n_ctx, vocab + 1)
    tokens, _, _ = induction_data(n_rows, vocab, length, seed=seed)
    return induction_task(tokens)


def discovery_task(task: ScrubTask, n: int = 200, *, seed: int = 0) -> DiscoveryTask:
    """Clean inputs: ``n`` random rows; corrupted inputs: ``n`` other random rows; metric: minus the task's loss."""
    rows = task.tokens.shape[0]
    if 2 * n > rows:
        raise ValueError(f"discovery needs 2 x n = {2 * n} rows, the task has {rows}")
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))

    def metric(logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return -task.loss(logits, clean)

    return DiscoveryTask(
        name=task.name,
        tokens=task.tokens,
        clean=perm[:n],
        corrupt=perm[n : 2 * n],
        metric=metric,
        position=task.position,
        attention_mask=task.attention_mask,
    )
