"""Token stores: a corpus split tokenised once into a flat memory-mapped array on disk, cut into sequences.

Stores are cached by content: the key hashes the corpus' fingerprint (every file's relative path, split and
contents, the split rule and fraction, the order), the split, the tokenizer and the store format, so anything
that would change the tokens gives a new store, and an unchanged corpus, wherever it lives, reuses its store.
Tokenisation streams documents in chunks, so the corpus never has to fit in memory. Documents are joined with the tokenizer's
``<|bos|>`` token (a document boundary the model can see).

>>> from interplab.data import open_corpus, corpus_tokenizer, build_token_store
>>> corpus = open_corpus("code")                 # a folder of .py files ("python-stdlib": the standard library)
>>> tok = corpus_tokenizer(corpus, vocab_size=300)
>>> store = build_token_store(corpus, tok, "validation")
>>> store.sequences(torch.tensor([0, 1]), seq_len=32).shape
torch.Size([2, 32])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from interplab.data.corpus import _LINES_PER_RECORD, Corpus, Split
from interplab.data.tokenizer import BPE_SPECIALS, Tokenizer, load_tokenizer, train_bpe
from interplab.io import atomic_path, atomic_write_json

_CHUNK_DOCS = 64
# bump when what a store holds for the same corpus and tokenizer changes (separator, dtype rule)
_STORE_FORMAT = "interplab-store-v2: <|bos|> before each non-empty document, uint16 below 65,536 ids"
_BPE_MIN_FREQUENCY = 2


def cache_dir() -> Path:
    """``$INTERPLAB_CACHE`` or ``~/.cache/interplab``."""
    return Path(os.environ.get("INTERPLAB_CACHE", Path.home() / ".cache" / "interplab")).expanduser()


@dataclass(frozen=True, kw_only=True)
class TokenStore:
    """A flat array of token ids on disk (memory-mapped), read as fixed-length sequences."""

    path: Path
    """the ``.bin`` file of token ids"""
    n_tokens: int
    """number of tokens in the store"""
    dtype: str
    """numpy dtype of the ids (``uint16`` below 65,536 ids, else ``uint32``)"""

    def array(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def n_sequences(self, seq_len: int) -> int:
        return self.n_tokens // seq_len

    def sequences(self, index: Int[Tensor, " n"], seq_len: int) -> Int[Tensor, "n seq_len"]:
        """Sequences number ``index`` (non-overlapping windows of ``seq_len`` tokens), as a long tensor."""
        n = self.n_sequences(seq_len)
        if n == 0:
            raise ValueError(f"the store has {self.n_tokens} tokens, fewer than one sequence of {seq_len}")
        idx = index.long().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"sequence index out of range: the store has {n} sequences of {seq_len} tokens")
        arr = self.array()
        rows = (
            np.stack([arr[i * seq_len : (i + 1) * seq_len] for i in idx])
            if idx.size
            else np.zeros((0, seq_len))
        )
        return torch.from_numpy(rows.astype(np.int64))


def _key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def corpus_tokenizer(corpus: Corpus, vocab_size: int, *, cache: Path | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer trained on the corpus' train split, cached by the corpus fingerprint (its
    files, their split and contents) and the whole training recipe (vocab size, minimum frequency, specials,
    the ``tokenizers`` version that trains it)."""
    import tokenizers

    cache = cache or cache_dir()
    recipe = json.dumps(
        {"bpe": "byte-level", "vocab_size": vocab_size, "min_frequency": _BPE_MIN_FREQUENCY,
         "specials": list(BPE_SPECIALS), "tokenizers": tokenizers.__version__},
        sort_keys=True,
    )  # fmt: skip
    key = _key(corpus.fingerprint(), Split.TRAIN.value, recipe)
    file = cache / "tokenizers" / f"{key}.json"
    if file.is_file():
        return load_tokenizer(file)
    if not any(corpus.documents(Split.TRAIN)):
        raise ValueError(empty_split_message(corpus, Split.TRAIN))
    tok = train_bpe(
        corpus.documents(Split.TRAIN), vocab_size, min_frequency=_BPE_MIN_FREQUENCY, specials=BPE_SPECIALS
    )
    tok.save(file)
    return tok


def build_token_store(
    corpus: Corpus,
    tokenizer: Tokenizer,
    split: Split | str = Split.TRAIN,
    *,
    cache: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> TokenStore:
    """Tokenise one split of a corpus into a memory-mapped store, or reuse the cached one.

    ``progress(n_tokens_so_far)`` is called after each chunk of documents."""
    split = Split(split)
    cache = cache or cache_dir()
    tok_hash = hashlib.sha256(_tokenizer_text(tokenizer).encode()).hexdigest()
    key = _key(corpus.fingerprint(), split.value, tok_hash, _STORE_FORMAT)
    folder = cache / "stores"
    meta_file = folder / f"{key}.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        bin_file = folder / f"{key}.bin"
        if (
            meta.get("key") == key
            and bin_file.is_file()
            and bin_file.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
        ):
            return TokenStore(path=bin_file, n_tokens=meta["n_tokens"], dtype=meta["dtype"])
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    sep = tokenizer.bos_id
    n_tokens = 0
    bin_file = folder / f"{key}.bin"
    with atomic_path(bin_file) as tmp, open(tmp, "wb") as out:
        chunk: list[str] = []

        def flush() -> None:
            nonlocal n_tokens
            ids: list[int] = []
            for row in tokenizer.encode_batch(chunk):
                if sep is not None:
                    ids.append(sep)
                ids.extend(row)
            np.asarray(ids, dtype=dtype).tofile(out)
            n_tokens += len(ids)
            chunk.clear()
            if progress is not None:
                progress(n_tokens)

        for doc in corpus.documents(split):
            if doc:
                chunk.append(doc)
            if len(chunk) >= _CHUNK_DOCS:
                flush()
        if chunk:
            flush()
        out.flush()
    if n_tokens == 0:
        bin_file.unlink(missing_ok=True)
        raise ValueError(empty_split_message(corpus, split))
    atomic_write_json(
        meta_file,
        {
            "n_tokens": n_tokens,
            "dtype": np.dtype(dtype).name,
            "key": key,
            "corpus": corpus.name,
            "split": split.value,
            "fingerprint": corpus.fingerprint(),
        },
    )
    return TokenStore(path=bin_file, n_tokens=n_tokens, dtype=np.dtype(dtype).name)


def empty_split_message(corpus: Corpus, split: Split) -> str:
    """Why a split of ``corpus`` holds no text, and what to do about it."""
    head = f"corpus {corpus.name!r} has no text in its {split.value} split"
    other = Split.TRAIN if split is Split.VALIDATION else Split.VALIDATION
    if not any(corpus.documents(other)):
        return f"{head} nor in any other: empty corpus ({len(corpus.units)} {corpus.kind} unit(s), no text)"
    held = f"val_fraction={corpus.val_fraction}"
    if corpus.kind == "files" and len(corpus.units) == 1:
        lines = len(Path(corpus.units[0]).read_text(encoding="utf-8", errors="replace").splitlines())
        records = -(-lines // _LINES_PER_RECORD)
        return (
            f"{head}: it is one file of {lines} lines, split into {records} record(s) of {_LINES_PER_RECORD} "
            f"lines with {held} of them held out for validation; give a longer file or a folder of several "
            "files" + (", or val_fraction=0" if split is Split.TRAIN else "")
        )
    return (
        f"{head}: its {len(corpus.units)} {corpus.kind} unit(s) are split by name with {held} held out for "
        "validation, and none fell on this side; give more files"
    )


def _tokenizer_text(tokenizer: Tokenizer) -> str:
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        return backend.to_str()
    return json.dumps({"itos": getattr(tokenizer, "itos", None)})
