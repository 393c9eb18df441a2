"""Corpora: where documents come from, with a fixed train/validation split by file (or by record).

- ``python-stdlib``: the ``.py`` files of the running interpreter's standard library (tests and site-packages
  left out), in sorted order. Every Python ships it, so the demo needs no network.
- a local text file or folder (``.txt``, ``.py``, ``.md`` ... read as UTF-8), ``.jsonl`` (field ``text``),
  ``.parquet`` (column ``text``, needs pyarrow),
- a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (needs ``datasets``).

Documents are yielded lazily (streaming), so a corpus may be larger than memory.

>>> corpus = open_corpus("python-stdlib")
>>> n = sum(1 for _ in corpus.documents("validation"))
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

STDLIB = "python-stdlib"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_TEXT_SUFFIXES = {
    ".txt",
    ".py",
    ".md",
    ".rst",
    ".c",
    ".h",
    ".js",
    ".ts",
    ".json",
    ".html",
    ".csv",
    ".tex",
    ".toml",
    ".yaml",
    ".yml",
    ".cfg",
    ".ini",
    ".sh",
    ".rs",
    ".go",
    ".java",
    ".cpp",
}


_LINES_PER_RECORD = 100


class Split(str, Enum):
    TRAIN = "train"
    VALIDATION = "validation"


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """A named collection of text documents split deterministically into train and validation."""

    name: str
    """``python-stdlib`` or the path it was opened from"""
    units: tuple[str, ...]
    """the files (or dataset path) it reads, in order"""
    kind: str
    """``files``, ``jsonl``, ``parquet`` or ``hf-disk``"""
    val_fraction: float = 0.05
    """fraction of files (records for single-file and dataset corpora) held out for validation"""

    def documents(self, split: Split | str = Split.TRAIN) -> Iterator[str]:
        """Yield the documents of one split, in a fixed order."""
        split = Split(split)
        if self.kind == "files" and len(self.units) > 1:
            for path in self.units:
                if _is_validation(path, self.val_fraction) == (split is Split.VALIDATION):
                    yield _read_text(Path(path))
            return
        for i, doc in enumerate(self._records()):
            if _is_validation(str(i), self.val_fraction) == (split is Split.VALIDATION):
                yield doc

    def _records(self) -> Iterator[str]:
        if self.kind == "files":
            # one text file: records are chunks of lines, so the split can hold part of it out
            lines = _read_text(Path(self.units[0])).splitlines(keepends=True)
            for i in range(0, len(lines), _LINES_PER_RECORD):
                yield "".join(lines[i : i + _LINES_PER_RECORD])
        elif self.kind == "jsonl":
            for path in self.units:
                yield from _jsonl(Path(path))
        elif self.kind == "parquet":
            for path in self.units:
                yield from _parquet(Path(path))
        else:
            yield from _hf_disk(Path(self.units[0]))

    def fingerprint(self) -> str:
        """A content hash of everything the corpus reads (the cache key of its token store)."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.kind}|{self.val_fraction}".encode())
        for unit in self.units:
            p = Path(unit)
            files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
            for f in files:
                h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
        return h.hexdigest()[:16]


def _is_validation(key: str, fraction: float) -> bool:
    # a hash of the file's name (not its position) keeps the split stable when files are added
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return (digest % 10_000) < fraction * 10_000


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON: {err}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f"{path}:{n} has no string field 'text' (each line must be {{\"text\": ...}})"
                )
            yield record["text"]


def _parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    file = pq.ParquetFile(path)
    if "text" not in file.schema_arrow.names:
        raise ValueError(f"{path} has no column 'text' (columns: {file.schema_arrow.names})")
    for batch in file.iter_batches(columns=["text"]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _hf_disk(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading the saved dataset {path} needs the datasets library: pip install datasets"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path} is a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise ValueError(f"{path} has no column 'text' (columns: {ds.column_names})")
    for record in ds:
        yield record["text"]


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (no tests, no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def open_corpus(source: str | Path, *, val_fraction: float = 0.05) -> Corpus:
    """Open ``python-stdlib``, a text/jsonl/parquet file, a folder of text files, or a saved HF dataset."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if str(source) == STDLIB:
        files = stdlib_files()
        if not files:
            raise ValueError(f"no standard-library .py files found under {sysconfig.get_paths()['stdlib']}")
        return Corpus(
            name=STDLIB, units=tuple(str(f) for f in files), kind="files", val_fraction=val_fraction
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {str(source)!r} does not exist (give a file, a folder, or {STDLIB!r})"
        )
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return Corpus(name=str(path), units=(str(path),), kind="hf-disk", val_fraction=val_fraction)
        jsonl = sorted(path.rglob("*.jsonl"))
        parquet = sorted(path.rglob("*.parquet"))
        if jsonl or parquet:
            kind, files = ("jsonl", jsonl) if jsonl else ("parquet", parquet)
            return Corpus(name=str(path), units=tuple(map(str, files)), kind=kind, val_fraction=val_fraction)
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in _TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"folder {path} has no text files ({', '.join(sorted(_TEXT_SUFFIXES))})")
        return Corpus(name=str(path), units=tuple(map(str, files)), kind="files", val_fraction=val_fraction)
    kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "files")
    return Corpus(name=str(path), units=(str(path),), kind=kind, val_fraction=val_fraction)
