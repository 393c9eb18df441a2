"""Tokenizers: byte-level BPE (through the ``tokenizers`` library) and a character-level one for tasks.

Both are saved as one ``tokenizer.json`` next to the model and load back with `load_tokenizer`.

>>> tok = train_bpe(["def f(x):\\n    return x\\n"] * 50, vocab_size=300)
>>> tok.decode(tok.encode("def f(x):"))
'def f(x):'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interplab import runs
from interplab.io import atomic_write_text

BOS = "<|bos|>"
PAD = "<|pad|>"
_CHAR_FORMAT = "interplab-char"
BPE_SPECIALS = (BOS, PAD)


class Tokenizer:
    """A tokenizer wrapping a ``tokenizers.Tokenizer`` (byte-level BPE); subclasses may tokenise differently.

    ``bos_id`` and ``pad_id`` are the ids of ``<|bos|>`` and ``<|pad|>`` (None if the vocabulary lacks them).
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.bos_id: int | None = backend.token_to_id(BOS)
        self.pad_id: int | None = backend.token_to_id(PAD)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, tokens: Tensor | Sequence[int] | Sequence[Sequence[int]]) -> Any:
        """A string for one sequence, a list of strings for a batch ([batch pos] tensor or nested lists)."""
        ids: list[Any] = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        if ids and isinstance(ids[0], list):
            return [self._decode(row) for row in ids]
        return self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def to_tokens(
        self, text: str | list[str], prepend_bos: bool = False, padding_side: str = "right"
    ) -> Int[Tensor, "batch pos"]:
        """Token ids [batch pos] (a single string gives batch 1); shorter rows are padded with ``pad_id``."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
        texts = [text] if isinstance(text, str) else list(text)
        rows = self.encode_batch(texts)
        if prepend_bos:
            if self.bos_id is None:
                raise ValueError("prepend_bos=True but the tokenizer has no <|bos|> token")
            rows = [[self.bos_id, *r] for r in rows]
        width = max((len(r) for r in rows), default=0)
        if any(len(r) != width for r in rows) and self.pad_id is None:
            raise ValueError("rows of different lengths need padding, but the tokenizer has no <|pad|> token")
        pad = self.pad_id or 0
        out = [
            (r + [pad] * (width - len(r))) if padding_side == "right" else ([pad] * (width - len(r)) + r)
            for r in rows
        ]
        return torch.tensor(out, dtype=torch.long).reshape(len(rows), width)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.backend.to_str())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (tasks: parentheses, digits ...), plus optional specials.

    >>> tok = CharTokenizer("()")
    >>> tok.encode("(())")
    [2, 2, 3, 3]
    """

    def __init__(self, alphabet: str | Sequence[str], specials: Sequence[str] = (PAD, BOS)) -> None:
        chars = list(alphabet)
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        if len(set(chars)) != len(chars):
            raise ValueError(f"alphabet {''.join(chars)!r} has repeated characters")
        if any(len(c) != 1 for c in chars):
            raise ValueError(f"alphabet entries must be single characters, got {chars}")
        self.specials = list(specials)
        self.alphabet = chars
        self.itos = self.specials + chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.bos_id = self.stoi.get(BOS)
        self.pad_id = self.stoi.get(PAD)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the alphabet {''.join(self.alphabet)!r}"
            ) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def save(self, path: str | Path) -> None:
        data = {"format": _CHAR_FORMAT, "alphabet": self.alphabet, "specials": self.specials}
        runs.write_json(Path(path), runs.Kind.TOKENIZER, data)


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, specials: Sequence[str] = BPE_SPECIALS
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation) on an iterable of documents.

    Deterministic for a given corpus and vocab_size. ``vocab_size`` counts the 256 byte tokens and specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(specials) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs more than {256 + len(specials)}"
        )
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = False

    def docs() -> Iterable[str]:
        nonlocal seen
        for t in texts:
            seen = seen or bool(t)
            yield t

    backend.train_from_iterator(docs(), trainer=trainer)
    if not seen:
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty documents)")
    return Tokenizer(backend)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a model folder or a file (BPE from ``tokenizers`` or interplab's char format)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file}")
    text = file.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if isinstance(data, dict) and data.get("format") == _CHAR_FORMAT:
        return CharTokenizer(data["alphabet"], specials=data.get("specials", ()))
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return Tokenizer(HFTokenizer.from_str(text))
    except Exception as err:  # the library raises a bare Exception subclass
        raise ValueError(f"{file} is not a tokenizers tokenizer.json: {err}") from None
