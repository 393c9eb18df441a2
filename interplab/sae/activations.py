"""Activation stores: stream activations from a model over token batches (with a shuffle buffer), or cache
them to disk once (see `interplab.sae.disk_store`) and read them back shuffled.

Every store yields dicts ``{hook_name: Tensor[batch, d]}`` whose rows are aligned across hooks, so several
SAEs (several layers, or a sweep of coefficients on one layer) train from one pass over the model.

>>> stream = ActivationStream(model, token_batches, ["blocks.0.hook_resid_post"], batch_size=4096)
>>> for batch in stream: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.data import build_token_store, open_corpus
from interplab.hooks import Site
from interplab.tasks import Task, get_task, list_tasks

if TYPE_CHECKING:
    from interplab.model import Transformer

ActivationBatch = dict[str, Tensor]


class _Stop(Exception):
    """Raised by the last capture hook to end a forward pass early (nothing after the hook is needed)."""


@dataclass(frozen=True, kw_only=True)
class TokenFilter:
    """Which token positions contribute activations."""

    exclude_bos: bool = True
    """drop position 0 of every sequence (the BOS / first token, whose activations are outliers)"""
    pad_token_id: int | None = None
    """drop positions holding this token (padding)"""
    bos_token_id: int | None = None
    """also drop any position holding this token (BOS inside packed sequences)"""

    def mask(self, tokens: Int[Tensor, "batch pos"]) -> Tensor:
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if self.exclude_bos:
            keep[:, 0] = False
        if self.pad_token_id is not None:
            keep &= tokens != self.pad_token_id
        if self.bos_token_id is not None:
            keep &= tokens != self.bos_token_id
        return keep


def model_activations(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    hooks: Sequence[str],
    *,
    token_filter: TokenFilter = TokenFilter(),
    dtype: torch.dtype | None = None,
) -> ActivationBatch:
    """Activations [n_kept_tokens, d] at each hook for one token batch, stopping the forward after the last
    hook. Positions are dropped by ``token_filter``; per-head sites are flattened to [n, n_heads * d_head]."""
    names = [Site.parse(h).name for h in hooks]
    missing = [n for n in names if n not in model.hook_points]
    if missing:
        model.hook_registry.resolve(missing[0])  # raises the model's own error (layer count, suggestions)
    keep = token_filter.mask(tokens)
    captured: dict[str, Tensor] = {}

    def grab(act: Tensor, site: Site) -> None:
        flat = act.reshape(act.shape[0], act.shape[1], -1)[keep]
        captured[site.name] = flat if dtype is None else flat.to(dtype)
        if len(captured) == len(names):
            raise _Stop

    with torch.no_grad(), model.hooks([(n, grab) for n in names]):
        try:
            model(tokens)
        except _Stop:
            pass
    return {n: captured[n] for n in names}


class ActivationStream:
    """Shuffled activation batches streamed from a model over an iterable of token batches.

    A buffer of ``buffer_tokens`` rows is filled, shuffled, and its first half served in batches; the
    second half stays and mixes with the next fill (so consecutive batches come from many contexts).
    """

    def __init__(
        self,
        model: Transformer,
        token_batches: Iterable[Tensor],
        hooks: Sequence[str],
        *,
        batch_size: int = 4096,
        buffer_tokens: int = 65536,
        token_filter: TokenFilter = TokenFilter(),
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size <= 0 or buffer_tokens < 2 * batch_size:
            raise ValueError(
                f"need batch_size > 0 and buffer_tokens >= 2 * batch_size, got {batch_size}, {buffer_tokens}"
            )
        self.model = model
        self.token_batches = token_batches
        self.hooks = [Site.parse(h).name for h in hooks]
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.token_filter = token_filter
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.tokens_seen = 0

    def __iter__(self) -> Iterator[ActivationBatch]:
        buffer: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        rows = 0
        source = iter(self.token_batches)
        exhausted = False
        while True:
            while rows < self.buffer_tokens and not exhausted:
                try:
                    toks = next(source)
                except StopIteration:
                    exhausted = True
                    break
                acts = model_activations(
                    self.model, _as_batch(toks), self.hooks, token_filter=self.token_filter
                )
                for h in self.hooks:
                    buffer[h].append(acts[h])
                rows += acts[self.hooks[0]].shape[0]
                self.tokens_seen += acts[self.hooks[0]].shape[0]
            if rows < self.batch_size:
                return
            merged = {h: torch.cat(buffer[h]) for h in self.hooks}
            perm = torch.randperm(rows, generator=self.generator)
            merged = {h: v[perm] for h, v in merged.items()}
            serve = rows if exhausted else rows // 2
            n_batches = serve // self.batch_size
            for i in range(n_batches):
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield {h: _to(v[sl], self.device) for h, v in merged.items()}
            used = n_batches * self.batch_size
            buffer = {h: [v[used:]] for h, v in merged.items()}
            rows -= used
            if exhausted:
                return


class TensorActivations:
    """Shuffled batches from activations already in memory (``{hook: Tensor[n, d]}``), for ``epochs`` passes."""

    def __init__(
        self, acts: dict[str, Float[Tensor, "n d"]], *, batch_size: int = 4096, epochs: int = 1, seed: int = 0
    ) -> None:
        sizes = {h: v.shape[0] for h, v in acts.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every hook needs the same number of rows, got {sizes}")
        self.acts = acts
        self.n = next(iter(sizes.values()))
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed

    def __len__(self) -> int:
        return self.epochs * (self.n // self.batch_size)

    def __iter__(self) -> Iterator[ActivationBatch]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            perm = torch.randperm(self.n, generator=g)
            for i in range(self.n // self.batch_size):
                rows = perm[i * self.batch_size : (i + 1) * self.batch_size]
                yield {h: v[rows] for h, v in self.acts.items()}


class SkippableBatches:
    """Batches that can begin at batch n without producing the n before it (how `train_saes` resumes on a
    cache without reading again the rows it already trained on): ``iter()`` starts at 0, ``from_batch(n)``
    at n; ``make(n)`` builds the iterator."""

    def __init__(self, make: Callable[[int], Iterator[ActivationBatch]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.make(0)

    def from_batch(self, n: int) -> Iterator[ActivationBatch]:
        return self.make(n)


def _as_batch(tokens: Tensor) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"token batches must be [batch, pos], got shape {tuple(tokens.shape)}")
    return tokens.long()


def loss_positions(
    tokens: Int[Tensor, "batch pos"], read: tuple[Tensor, Tensor] | None = None, *, n_classes: int
) -> tuple[Bool[Tensor, "batch pos"], Int[Tensor, " n"]]:
    """Where a model's loss is read, and against what: ``(mask, targets)``, so that ``logits[mask]`` are the
    rows to score against ``targets``. Every next token (``read`` None, a text corpus: every position but the
    last, against the token after it), or a task's ``(targets, loss_mask)`` [batch pos]
    (`CorpusBatches.targets`) at the masked positions, where the task's model is trained. A next token that is
    no class of the model (``n_classes``; modular addition's ``=``) is an error naming the fix."""
    if read is None:
        target = tokens[:, 1:].reshape(-1)
        if target.numel() and int(target.max()) >= n_classes:
            raise ValueError(
                f"the model predicts {n_classes} classes but the tokens hold id {int(target.max())} as a next "
                "token: a task whose targets are not next tokens (modadd's answer); pass its targets and loss "
                "mask (targets=, `CorpusBatches.targets` of `corpus_token_batches('task:NAME')`)"
            )
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, -1] = False
        return mask, target
    task_target, mask = (t.to(tokens.device) for t in read)
    if task_target.shape != tokens.shape or mask.shape != tokens.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"targets {tuple(task_target.shape)} and a bool loss mask {tuple(mask.shape)} {mask.dtype} must "
            f"match the tokens {tuple(tokens.shape)}"
        )
    if not bool(mask.any()):
        raise ValueError("a batch's loss mask selects no position")
    return mask, task_target[mask]


def _to(t: Tensor, device: torch.device | str | None) -> Tensor:
    return t if device is None else t.to(device, non_blocking=True)


@dataclass(frozen=True)
class CorpusBatches:
    """Token batches of a corpus, the filter that drops BOS and padding, and a description of where they came
    from (for the manifests of resumable jobs)."""

    batches: list[Tensor]
    token_filter: TokenFilter
    source: dict[str, Any]
    """corpus, its content fingerprint, split, seq_len, batch_size, seed, n_batches"""
    targets: list[tuple[Tensor, Tensor]] | None = None
    """for a task, per batch its ``(targets, loss_mask)`` [batch pos]: the predictions its model is trained on,
    where `evaluate_sae` measures the loss (None, a text corpus: every next token)"""


TASK_PREFIX = "task:"
"""a corpus spelled ``task:NAME`` is examples of the `interplab.tasks` task NAME (as in a training config)"""
#: the tasks whose examples an SAE can read (unpadded, so no attention mask is needed)
SAE_TASKS = ("induction", "modadd", "sorting")
#: task examples per split unless told otherwise: about 2^20 tokens
TASK_TOKENS = 2**20


def task_token_batches(
    model: Transformer,
    task: Task,
    *,
    split: str = "train",
    batch_size: int = 16,
    n_batches: int | None = None,
    seed: int = 0,
) -> CorpusBatches:
    """Token batches [batch_size, task.seq_len] of examples of ``task`` (its default parameters unless given
    built), drawn with seeds that differ between splits and from the ones `interplab train` draws, and the
    filter that drops position 0 (the bos / first token). ``n_batches`` None: about `TASK_TOKENS` tokens. The
    model must read the task's inputs: same vocabulary, a context window that holds one example."""
    split = str(getattr(split, "value", split))
    if task.name not in SAE_TASKS:
        raise ValueError(
            f"task {task.name!r} pads its examples (they need an attention mask, which SAE activations are "
            f"read without); tasks an SAE can read: {', '.join(SAE_TASKS)}"
        )
    if split not in ("train", "validation"):
        raise ValueError(f"split {split!r} must be train or validation")
    if model.cfg.d_vocab != task.d_vocab or model.cfg.n_ctx < task.seq_len:
        raise ValueError(
            f"the model (d_vocab {model.cfg.d_vocab}, n_ctx {model.cfg.n_ctx}) does not read task {task.name!r} "
            f"(d_vocab {task.d_vocab}, {task.seq_len} tokens per example): give a model trained on "
            f"task:{task.name} with its default parameters"
        )
    total = max(1, TASK_TOKENS // (batch_size * task.seq_len)) if n_batches is None else n_batches
    base = (2 if split == "validation" else 1) * 1_000_000_007 + seed * 100_003
    made = [task.generate(batch_size, seed=(base + i) % 2**62) for i in range(total)]
    batches = [m.tokens for m in made]
    source = {"corpus": f"{TASK_PREFIX}{task.name}", "task": task.to_dict(), "split": split,
              "seq_len": task.seq_len, "batch_size": batch_size, "seed": seed, "n_batches": total}  # fmt: skip
    targets = [(m.targets, m.loss_mask) for m in made]
    return CorpusBatches(batches, TokenFilter(exclude_bos=True), source, targets)


def corpus_token_batches(
    model: Transformer,
    corpus: str = "python-stdlib",
    *,
    split: str = "train",
    seq_len: int = 128,
    batch_size: int = 16,
    n_batches: int | None = None,
    seed: int = 0,
) -> CorpusBatches:
    """Token batches [batch_size, seq_len] of a corpus tokenised with the model's own tokenizer (through the
    token stores of `interplab.data`, cached by content), in a seeded order, and the filter that drops BOS and
    padding for that tokenizer. Deterministic, so an interrupted `cache_activations` can resume. A corpus
    ``task:NAME`` is examples of that task (`task_token_batches`; ``seq_len`` is the task's own)."""
    if str(corpus).startswith(TASK_PREFIX):
        name = str(corpus)[len(TASK_PREFIX) :]
        if name not in list_tasks():
            raise ValueError(f"unknown task {name!r} in {corpus!r}; valid tasks: {', '.join(list_tasks())}")
        return task_token_batches(
            model, get_task(name), split=split, batch_size=batch_size, n_batches=n_batches, seed=seed
        )
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "the model has no tokenizer (tokenizer.json beside its weights): pass token batches directly, or "
            f"give a task as the corpus ({', '.join(TASK_PREFIX + t for t in SAE_TASKS)})"
        )
    if not 0 < seq_len <= model.cfg.n_ctx:  # never shortened silently
        raise ValueError(
            f"seq_len={seq_len} must be in 1..{model.cfg.n_ctx} (the model's context window n_ctx)"
        )
    opened = open_corpus(corpus)
    store = build_token_store(opened, tok, split)
    n_seq = store.n_sequences(seq_len)
    total = n_seq // batch_size if n_batches is None else min(n_batches, n_seq // batch_size)
    if total == 0:
        raise ValueError(
            f"corpus {corpus!r} ({split}) has {n_seq} sequences of {seq_len}: fewer than one batch of {batch_size}"
        )
    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed))
    batches = [store.sequences(order[i * batch_size : (i + 1) * batch_size], seq_len) for i in range(total)]
    source = {
        "corpus": str(corpus),
        "corpus_fingerprint": opened.fingerprint(),
        "split": str(getattr(split, "value", split)),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "n_batches": total,
    }
    return CorpusBatches(
        batches, TokenFilter(exclude_bos=True, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id), source
    )
