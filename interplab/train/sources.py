"""Training data sources: a tokenised corpus (next-token prediction) or an algorithmic task.

Every batch is a pure function of ``(seed, step)``, so resuming from a checkpoint replays the same data,
and ``rows`` slices one process' / micro-batch's share of the global batch for data parallelism.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from interplab.data import build_token_store, corpus_tokenizer, open_corpus
from interplab.tasks import get_task
from interplab.train.config import TrainConfig


class Source(Protocol):
    """What the trainer needs from a data source."""

    d_vocab: int
    tokenizer: Any

    def batch(self, step: int, rows: slice) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> Tensor: ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``logits`` [batch pos vocab] on ``tokens`` [batch pos]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


class CorpusSource:
    """Non-overlapping windows of a token store, visited in a seeded random order (a new one each epoch)."""

    def __init__(self, cfg: TrainConfig, *, progress: Any = None) -> None:
        d = cfg.data
        corpus = open_corpus(d.source, val_fraction=d.val_fraction)
        self.tokenizer = corpus_tokenizer(corpus, d.vocab_size)
        self.d_vocab = self.tokenizer.vocab_size
        self.train = build_token_store(corpus, self.tokenizer, "train", progress=progress)
        self.val = build_token_store(corpus, self.tokenizer, "validation") if d.val_fraction > 0 else None
        self.seq_len = d.seq_len
        self.n_train = self.train.n_sequences(self.seq_len)
        if self.n_train < cfg.batch_size:
            raise ValueError(
                f"corpus {d.source!r} has {self.train.n_tokens} training tokens, fewer than one batch of "
                f"{cfg.batch_size} x {self.seq_len}"
            )
        self.batch_size = cfg.batch_size
        self.seed = cfg.seed
        self.eval_batches = cfg.eval_batches
        self._perm: tuple[int, Tensor] | None = None

    def _order(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n_train, generator=g))
        return self._perm[1]

    def indices(self, step: int, rows: slice = slice(None)) -> Tensor:
        """Indices (in the training token store) of the sequences in batch ``step`` (training data attribution
        reads them to know which examples each step trained on)."""
        start = step * self.batch_size
        index = torch.arange(start, start + self.batch_size)[rows]
        epochs, offsets = index // self.n_train, index % self.n_train
        return torch.stack([self._order(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])

    def batch(self, step: int, rows: slice) -> Tensor:
        return self.train.sequences(self.indices(step, rows), self.seq_len)

    def loss(self, model: torch.nn.Module, batch: Tensor) -> Tensor:
        return lm_loss(model(batch), batch)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if self.val is None:
            return {}
        n_val = self.val.n_sequences(self.seq_len)
        n = min(n_val, self.eval_batches * self.batch_size)
        if n == 0:
            return {}
        # a fixed, evenly spread set of held-out windows: comparable across steps and runs
        index = torch.linspace(0, n_val - 1, n).round().long()
        losses = []
        for chunk in index.split(self.batch_size):
            tokens = self.val.sequences(chunk, self.seq_len)
            losses.append(lm_loss(model(tokens), tokens))
        return {"val_loss": float(torch.stack(losses).mean())}


class TaskSource:
    """Fresh task examples every step (``Task.generate(batch_size, seed=f(seed, step))``)."""

    def __init__(self, cfg: TrainConfig, task: Any = None) -> None:
        if task is None:
            name = cfg.data.task
            assert name is not None
            task = get_task(name, **cfg.data.task_args)
        self.task = task
        task_cfg = self.task.model_config()
        self.model_cfg = task_cfg
        self.d_vocab = task_cfg.d_vocab
        self.d_vocab_out = task_cfg.d_vocab_out
        self.n_ctx = task_cfg.n_ctx
        self.seq_len = int(getattr(self.task, "seq_len", task_cfg.n_ctx))
        self.tokenizer = getattr(self.task, "tokenizer", None)
        self.batch_size = cfg.batch_size
        self.seed = cfg.seed
        self.eval_size = cfg.eval_batches * cfg.batch_size
        self._cached: tuple[int, Any] | None = None

    def batch(self, step: int, rows: slice) -> Any:
        if self._cached is None or self._cached[0] != step:
            self._cached = (step, self.task.generate(self.batch_size, seed=self.seed * 1_000_003 + step + 1))
        full = self._cached[1]
        return _slice_batch(full, rows)

    def loss(self, model: torch.nn.Module, batch: Any) -> Tensor:
        return self.task.loss(model(batch.tokens, attention_mask=batch.attention_mask), batch)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        # a held-out seed stream (negative seeds are never used for training)
        batch = self.task.generate(self.eval_size, seed=-(self.seed + 1) % (2**31))
        logits = model(batch.tokens, attention_mask=batch.attention_mask)
        out = {"val_loss": float(self.task.loss(logits, batch))}
        for key, value in self.task.metrics(logits, batch).items():
            out[f"val_{key}"] = float(value)
        return out


def _slice_batch(batch: Any, rows: slice) -> Any:
    import dataclasses

    if hasattr(batch, "select"):  # interplab.tasks.TaskBatch (slices its meta too)
        return batch.select(rows)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: getattr(batch, f.name)[rows]
            for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), Tensor)
        }
        return dataclasses.replace(batch, **changes)
    return batch[rows]


def make_source(cfg: TrainConfig, *, task: Any = None, progress: Any = None) -> CorpusSource | TaskSource:
    """The data source of a config (``task`` overrides ``data.source``: any object with the Task interface)."""
    if task is not None or cfg.data.task is not None:
        return TaskSource(cfg, task)
    return CorpusSource(cfg, progress=progress)


def rows_for(batch_size: int, micro: int, grad_accum: int, rank: int, world: int) -> slice:
    """The rows of the global batch that micro-batch ``micro`` of process ``rank`` trains on."""
    per = batch_size // (grad_accum * world)
    start = (micro * world + rank) * per
    return slice(start, start + per)


def cosine_lr(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
