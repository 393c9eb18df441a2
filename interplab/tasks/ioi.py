"""Indirect object identification (Wang et al. 2022) as a word-level template task.

"When Mary and John went to the store, John gave a drink to" -> "Mary". Two names enter the first clause; one
of them (the subject, S) is repeated; the answer is the other (the indirect object, IO). Each example comes
with its ABC corruption (the same template with three fresh distinct names, so that nothing identifies the IO),
the positions of the names, and optionally a distractor sentence naming a third person first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from interplab.model.config import ModelConfig
from interplab.tasks.base import Task, TaskBatch, check_n

NAMES = (
    "Mary", "John", "Alice", "Bob", "Kate", "Tom", "Sarah", "James", "Anna", "David",
    "Laura", "Paul", "Emma", "Mark", "Lisa", "Peter", "Julia", "Steve", "Clara", "Henry",
)  # fmt: skip
PLACES = ("store", "park", "school", "office", "garden", "station", "market", "library")
OBJECTS = ("drink", "book", "ring", "letter", "bone", "kiss", "basketball", "snack")
# {A} and {B} are the two names of the first clause, {S} the repeated subject.
TEMPLATES = (
    "When {A} and {B} went to the {PLACE} , {S} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE} , {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE} , {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE} , {S} decided to give it to",
    "Then , {A} and {B} had a long argument , and afterwards {S} said to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE} . {S} gave it to",
    "After the lunch , {A} and {B} went to the {PLACE} . {S} gave a {OBJECT} to",
    "The {PLACE} {A} and {B} went to had a {OBJECT} . {S} gave it to",
)
DISTRACTOR = "{D} was at the {PLACE} too ."
PAD, BOS = "[pad]", "[bos]"


def _words(text: str) -> list[str]:
    return text.split(" ")


def _build_vocab() -> list[str]:
    words: set[str] = set()
    for template in (*TEMPLATES, DISTRACTOR):
        words.update(w for w in _words(template) if not w.startswith("{"))
    return [PAD, BOS, *sorted(words), *PLACES, *OBJECTS, *NAMES]


VOCAB = _build_vocab()
TOKEN = {w: i for i, w in enumerate(VOCAB)}


@dataclass(frozen=True, kw_only=True)
class IOITask(Task):
    """Word-level IOI. Examples are right-padded to ``seq_len``; the answer is read at the last real token
    (``meta["end_pos"]``), whose target is the IO token. Half of the examples are ABBA (IO first), half BABA.

    ``meta``: ``corrupted_tokens`` (ABC), ``io_token``, ``s_token``, ``io_pos``, ``s1_pos``, ``s2_pos``,
    ``end_pos``, ``template`` (index into TEMPLATES), ``distractor`` (bool), ``names`` (IO, S[, D])."""

    name: ClassVar[str] = "ioi"

    n_names: int = len(NAMES)
    """how many names of NAMES are used (at least 5: IO, S and three fresh corrupting names)"""
    n_templates: int = len(TEMPLATES)
    """how many templates of TEMPLATES are used"""
    p_distractor: float = 0.0
    """probability of a leading sentence naming a third person ("Kate was at the park too .")"""

    def __post_init__(self) -> None:
        if not isinstance(self.n_names, int) or not 5 <= self.n_names <= len(NAMES):
            raise ValueError(f"n_names must be an int in [5, {len(NAMES)}], got {self.n_names!r}")
        if not isinstance(self.n_templates, int) or not 1 <= self.n_templates <= len(TEMPLATES):
            raise ValueError(f"n_templates must be an int in [1, {len(TEMPLATES)}], got {self.n_templates!r}")
        if not 0.0 <= self.p_distractor <= 1.0:
            raise ValueError(f"p_distractor must be in [0, 1], got {self.p_distractor!r}")

    @property
    def d_vocab(self) -> int:
        return len(VOCAB)

    @property
    def seq_len(self) -> int:
        longest = max(len(_words(t)) for t in TEMPLATES[: self.n_templates])
        return 1 + len(_words(DISTRACTOR)) + longest

    @property
    def vocab(self) -> list[str]:
        return list(VOCAB)

    def generate(self, n: int, *, seed: int) -> TaskBatch:
        check_n(n)
        rng = np.random.default_rng(seed)
        names = NAMES[: self.n_names]
        clean, corrupt, rows = [], [], []
        for _ in range(n):
            template = int(rng.integers(self.n_templates))
            picked = [names[i] for i in rng.choice(self.n_names, size=5, replace=False)]
            io, s, a, b, c = picked
            distractor = bool(rng.random() < self.p_distractor)
            d = names[int(rng.choice([i for i, x in enumerate(names) if x not in (io, s)]))]
            fill = {
                "PLACE": PLACES[int(rng.integers(len(PLACES)))],
                "OBJECT": OBJECTS[int(rng.integers(len(OBJECTS)))],
                "D": d,
            }
            abba = bool(rng.random() < 0.5)
            first, second = (io, s) if abba else (s, io)
            words, pos = _render(template, first, second, s, fill, distractor)
            corrupt_words, _ = _render(template, a, b, c, fill, distractor)
            clean.append(words)
            corrupt.append(corrupt_words)
            rows.append(
                dict(
                    io=io,
                    s=s,
                    d=d,
                    template=template,
                    distractor=distractor,
                    end=len(words) - 1,
                    io_pos=pos["A"] if abba else pos["B"],
                    s1_pos=pos["B"] if abba else pos["A"],
                    s2_pos=pos["S"],
                )  # fmt: skip
            )
        tokens = self._encode(clean)
        corrupted = self._encode(corrupt)
        end = torch.tensor([r["end"] for r in rows])
        io_tok = torch.tensor([TOKEN[r["io"]] for r in rows])
        arange = torch.arange(n)
        targets = torch.zeros_like(tokens)
        targets[:, :-1] = tokens[:, 1:]
        targets[arange, end] = io_tok
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[arange, end] = True
        meta = {
            "corrupted_tokens": corrupted,
            "io_token": io_tok,
            "s_token": torch.tensor([TOKEN[r["s"]] for r in rows]),
            "io_pos": torch.tensor([r["io_pos"] for r in rows]),
            "s1_pos": torch.tensor([r["s1_pos"] for r in rows]),
            "s2_pos": torch.tensor([r["s2_pos"] for r in rows]),
            "end_pos": end,
            "template": torch.tensor([r["template"] for r in rows]),
            "distractor": torch.tensor([r["distractor"] for r in rows]),
            "names": [(r["io"], r["s"], r["d"]) if r["distractor"] else (r["io"], r["s"]) for r in rows],
        }
        return TaskBatch(
            tokens=tokens,
            targets=targets,
            loss_mask=loss_mask,
            attention_mask=tokens != TOKEN[PAD],
            meta=meta,
        )

    def _encode(self, sentences: list[list[str]]) -> Tensor:
        out = torch.full((len(sentences), self.seq_len), TOKEN[PAD], dtype=torch.long)
        for i, words in enumerate(sentences):
            out[i, : len(words)] = torch.tensor([TOKEN[w] for w in words])
        return out

    def decode(self, tokens: Tensor) -> str:
        """The sentence of one example's tokens, without padding."""
        return " ".join(VOCAB[t] for t in tokens.tolist() if VOCAB[t] != PAD)

    def model_config(self, **overrides: Any) -> ModelConfig:
        defaults = dict(d_model=128, n_layers=2, n_heads=4, d_vocab=self.d_vocab, n_ctx=self.seq_len)
        return self._config(defaults, overrides)

    def task_metrics(
        self, logits: Float[Tensor, "batch pos d_vocab_out"], batch: TaskBatch
    ) -> dict[str, float]:
        n = logits.shape[0]
        dev = logits.device
        final = logits[torch.arange(n, device=dev), batch.meta["end_pos"].to(dev)]
        io = final.gather(1, batch.meta["io_token"].to(dev)[:, None])[:, 0]
        s = final.gather(1, batch.meta["s_token"].to(dev)[:, None])[:, 0]
        diff = (io - s).float()
        return {"logit_diff": float(diff.mean()), "io_over_s": float((diff > 0).float().mean())}


def _render(
    template: int, first: str, second: str, subject: str, fill: dict[str, str], distractor: bool
) -> tuple[list[str], dict[str, int]]:
    """Words of one sentence (bos first) and the positions of the slots A, B and S."""
    text = TEMPLATES[template]
    if distractor:
        text = DISTRACTOR + " " + text
    words = [BOS]
    pos: dict[str, int] = {}
    for w in _words(text):
        slot = re.fullmatch(r"\{(\w+)\}", w)
        if slot is None:
            words.append(w)
            continue
        key = slot.group(1)
        pos.setdefault(key, len(words))
        words.append({"A": first, "B": second, "S": subject}.get(key) or fill[key])
    return words, pos
