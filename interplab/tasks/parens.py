"""Balanced-parenthesis classification, exactly as the paren balancer of Redwood Research's causal scrubbing
work: tokens ``[start]=0 [pad]=1 [end]=2 (=3 )=4``, a string ``s`` becomes ``[0] + tokens(s) + [2]`` padded
to 42 positions, attention never reads pads, and the class (1 = balanced) is read at position 0.

The features the published hypotheses use are plain functions of the string: ``count_equal`` (as many
``(`` as ``)``), ``horizon_ok`` (reading right to left, no suffix has more ``(`` than ``)``) and
``is_balanced`` (both; equivalently every prefix has at least as many ``(`` as ``)`` and the counts match).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.model.config import ModelConfig
from interplab.tasks.base import Task, TaskBatch, check_n

START, PAD, END, OPEN, CLOSE = 0, 1, 2, 3, 4
VOCAB = ["[start]", "[pad]", "[end]", "(", ")"]
N_CTX = 42
MAX_LEN = N_CTX - 2


def count_equal(s: str) -> bool:
    """As many ``(`` as ``)``."""
    return s.count("(") == s.count(")")


def horizon_ok(s: str) -> bool:
    """Reading right to left, no suffix has more ``(`` than ``)``."""
    depth = 0
    for c in reversed(s):
        depth += 1 if c == "(" else -1
        if depth > 0:
            return False
    return True


def is_balanced(s: str) -> bool:
    """Every ``(`` is closed by a later ``)`` and nothing else: ``count_equal(s) and horizon_ok(s)``."""
    return count_equal(s) and horizon_ok(s)


def paren_tokens(strings: Sequence[str], n_ctx: int = N_CTX) -> Int[Tensor, "batch pos"]:
    """``[start] + tokens(s) + [end]`` padded with ``[pad]`` to ``n_ctx`` positions."""
    out = torch.full((len(strings), n_ctx), PAD, dtype=torch.long)
    for i, s in enumerate(strings):
        if len(s) > n_ctx - 2:
            raise ValueError(f"string {i} has {len(s)} characters; at most {n_ctx - 2} fit in n_ctx={n_ctx}")
        bad = set(s) - {"(", ")"}
        if bad:
            raise ValueError(f"string {i} {s!r} has characters {sorted(bad)}; only '(' and ')' are allowed")
        out[i, 0] = START
        out[i, 1 : len(s) + 1] = torch.tensor([OPEN if c == "(" else CLOSE for c in s], dtype=torch.long)
        out[i, len(s) + 1] = END
    return out


def paren_batch(strings: Sequence[str], labels: Sequence[bool] | None = None) -> TaskBatch:
    """A classification batch for ``strings``; ``labels`` (from a data set) must agree with ``is_balanced``."""
    balanced = [is_balanced(s) for s in strings]
    if labels is not None:
        if len(labels) != len(strings):
            raise ValueError(f"{len(labels)} labels for {len(strings)} strings")
        for i, (s, given, computed) in enumerate(zip(strings, labels, balanced, strict=True)):
            if bool(given) != computed:
                raise ValueError(
                    f"example {i} {s!r} is labelled balanced={given}, but is_balanced gives {computed}"
                )
    tokens = paren_tokens(strings)
    targets = torch.zeros_like(tokens)
    targets[:, 0] = torch.tensor(balanced, dtype=torch.long)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, 0] = True
    equal = torch.tensor([count_equal(s) for s in strings], dtype=torch.bool)
    horizon = torch.tensor([horizon_ok(s) for s in strings], dtype=torch.bool)
    meta = {
        "strings": list(strings),
        "balanced": torch.tensor(balanced, dtype=torch.bool),
        "equal_count": equal,
        "horizon_ok": horizon,
        "count_failure": ~equal,
        "horizon_failure": ~horizon,
    }
    return TaskBatch(
        tokens=tokens, targets=targets, loss_mask=loss_mask, attention_mask=tokens != PAD, meta=meta
    )


@lru_cache(maxsize=4)
def _read_jsonl(path: str, mtime: float) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    opener = gzip.open if path.endswith(".gz") else open
    strings: list[str] = []
    labels: list[bool] = []
    with opener(path, "rt") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s, label = json.loads(line)
            except (ValueError, TypeError):
                raise ValueError(
                    f"{path}:{line_no}: expected a JSON pair [string, bool], got {line[:80]!r}"
                ) from None
            strings.append(s)
            labels.append(bool(label))
    if not strings:
        raise ValueError(f"{path} holds no examples")
    return tuple(strings), tuple(labels)


def load_paren_strings(path: str | Path) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """(strings, labels) of a ``["(()", false]`` per line JSONL file (gzipped or not), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paren data set {path} does not exist")
    return _read_jsonl(str(path.resolve()), path.stat().st_mtime)


def parens_from_file(path: str | Path, *, limit: int | None = None) -> TaskBatch:
    """The real data set (e.g. ``remix_parens.jsonl.gz``) as a batch in file order, labels checked."""
    strings, labels = load_paren_strings(path)
    if limit is not None:
        check_n(limit)
        strings, labels = strings[:limit], labels[:limit]
    return paren_batch(strings, labels)


@dataclass(frozen=True, kw_only=True)
class ParensTask(Task):
    """Paren balancing. With ``source`` set, ``generate`` samples (without replacement) from that JSONL data
    set; otherwise it draws even-length strings from a mixture of balanced strings, count failures only,
    horizon failures only, and both failures."""

    name: ClassVar[str] = "parens"

    source: str | None = None
    """a ``[string, bool]`` JSONL(.gz) file to sample from instead of the generator"""
    max_len: int = MAX_LEN
    """longest generated string (even, at most 40)"""
    p_balanced: float = 0.5
    """generator: fraction of balanced strings"""
    p_count_failure: float = 0.15
    """generator: fraction with unequal counts whose horizon is fine"""
    p_horizon_failure: float = 0.15
    """generator: fraction with equal counts whose horizon fails"""
    p_both_failures: float = 0.2
    """generator: fraction failing both tests"""

    def __post_init__(self) -> None:
        if self.source is not None:
            object.__setattr__(self, "source", str(self.source))
        if not isinstance(self.max_len, int) or not 2 <= self.max_len <= MAX_LEN or self.max_len % 2:
            raise ValueError(f"max_len must be an even int in [2, {MAX_LEN}], got {self.max_len!r}")
        probs = self._mixture()
        if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"mixture probabilities {probs} must be >= 0 and sum to 1")
        if self.max_len < 4 and (self.p_horizon_failure > 0 or self.p_both_failures > 0):
            raise ValueError(f"max_len={self.max_len} is too short for horizon failures; use max_len >= 4")

    def _mixture(self) -> tuple[float, float, float, float]:
        return (self.p_balanced, self.p_count_failure, self.p_horizon_failure, self.p_both_failures)

    @property
    def d_vocab(self) -> int:
        return 5

    @property
    def d_vocab_out(self) -> int:
        return 2

    @property
    def seq_len(self) -> int:
        return N_CTX

    @property
    def vocab(self) -> list[str]:
        return list(VOCAB)

    def generate(self, n: int, *, seed: int) -> TaskBatch:
        check_n(n)
        rng = np.random.default_rng(seed)
        if self.source is not None:
            strings, labels = load_paren_strings(self.source)
            if n > len(strings):
                raise ValueError(f"n={n} is more than the {len(strings)} examples in {self.source}")
            rows = rng.choice(len(strings), size=n, replace=False)
            return paren_batch([strings[i] for i in rows], [labels[i] for i in rows])
        kinds = rng.choice(4, size=n, p=np.array(self._mixture()) / sum(self._mixture()))
        makers = (_balanced, _count_failure, _horizon_failure, _both_failures)
        return paren_batch([makers[k](rng, self.max_len) for k in kinds])

    def model_config(self, **overrides: Any) -> ModelConfig:
        # the published paren balancer's architecture
        defaults = dict(
            d_model=56,
            n_layers=3,
            n_heads=2,
            d_mlp=56,
            d_vocab=5,
            d_vocab_out=2,
            n_ctx=N_CTX,
            act_fn="relu",
            causal=False,
        )
        return self._config(defaults, overrides)

    def task_metrics(
        self, logits: Float[Tensor, "batch pos d_vocab_out"], batch: TaskBatch
    ) -> dict[str, float]:
        right = (logits[:, 0].argmax(-1) == batch.targets[:, 0].to(logits.device)).cpu()
        out: dict[str, float] = {}
        meta = batch.meta
        groups = {
            "balanced": meta["balanced"],
            "count_failure": meta["count_failure"],
            "horizon_failure_only": meta["equal_count"] & meta["horizon_failure"],
            "count_failure_only": meta["count_failure"] & meta["horizon_ok"],
        }
        for group, mask in groups.items():
            mask = mask.cpu()
            if mask.any():
                out[f"accuracy_{group}"] = float(right[mask].float().mean())
        return out


# ---- the generator ------------------------------------------------------------------------------
def _dyck(rng: np.random.Generator, pairs: int) -> str:
    """A uniformly random balanced string of ``pairs`` pairs (the Atkinson-Sack bijection from a shuffle)."""
    chars = ["("] * pairs + [")"] * pairs
    rng.shuffle(chars)
    return _balance("".join(chars))


def _balance(w: str) -> str:
    out_head: list[str] = []
    tails: list[str] = []
    while w:
        depth, i = 0, 0
        for i, c in enumerate(w):  # noqa: B007  (i is the end of the first excursion)
            depth += 1 if c == "(" else -1
            if depth == 0:
                break
        first, w = w[: i + 1], w[i + 1 :]
        if first[0] == "(":
            out_head.append(first)
        else:  # a negative excursion ")v(" becomes "(" + balance(rest) + ")" + flip(v)
            out_head.append("(")
            tails.append(")" + first[1:-1].translate(_FLIP))
    return "".join(out_head) + "".join(reversed(tails))


_FLIP = str.maketrans("()", ")(")


def _even_len(rng: np.random.Generator, max_len: int, minimum: int = 2) -> int:
    return 2 * int(rng.integers(minimum // 2, max_len // 2 + 1))


def _balanced(rng: np.random.Generator, max_len: int) -> str:
    return _dyck(rng, _even_len(rng, max_len) // 2)


def _count_failure(rng: np.random.Generator, max_len: int) -> str:
    """Unequal counts, horizon fine: a balanced string with extra ``)`` inserted (never breaks the horizon)."""
    length = _even_len(rng, max_len)
    extra = 2 * int(rng.integers(1, length // 2 + 1))
    chars = list(_dyck(rng, (length - extra) // 2))
    for _ in range(extra):
        chars.insert(int(rng.integers(0, len(chars) + 1)), ")")
    return "".join(chars)


def _horizon_failure(rng: np.random.Generator, max_len: int) -> str:
    """Equal counts, horizon broken: a shuffle of k ``(`` and k ``)`` that is not balanced."""
    length = _even_len(rng, max_len, minimum=4) if max_len >= 4 else 2
    if length == 2:
        return ")("
    while True:
        chars = ["("] * (length // 2) + [")"] * (length // 2)
        rng.shuffle(chars)
        s = "".join(chars)
        if not horizon_ok(s):
            return s


def _both_failures(rng: np.random.Generator, max_len: int) -> str:
    """Unequal counts and a broken horizon."""
    while True:
        length = _even_len(rng, max_len)
        s = "".join(rng.choice(["(", ")"], size=length))
        if not count_equal(s) and not horizon_ok(s):
            return s
