"""Corpora: where documents come from, with a fixed train/validation split by file (or by record).

The split and the cache key depend only on what a corpus *is*, never on where it lives: a file is named by
its path relative to the corpus root (the folder opened, or the standard library's folder), so a copy of a
corpus in another folder (or another Python install of the same library) has the same split, the same
tokenizer and the same tokens.

- ``python-stdlib``: the ``.py`` files of the running interpreter's standard library (tests and site-packages
  left out), in sorted order. Every Python ships it, so the demo needs no network.
- a local text file or folder (``.txt``, ``.py``, ``.md`` ... read as UTF-8), ``.jsonl`` (field ``text``),
  ``.parquet`` (column ``text``, needs pyarrow),
- a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (needs ``datasets``).

Documents are yielded lazily (streaming), so a corpus may be larger than memory.

>>> corpus = open_corpus("code")                 # a folder of .py files ("python-stdlib": the standard library)
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

from interplab.io import file_sha256

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
# bump when the split rule, the record rule or the file order changes: it is part of every cache key
_SPLIT_SCHEME = (
    "interplab-split-v2: sha256(relative posix path or record index), files sorted by relative path"
)


class Split(str, Enum):
    TRAIN = "train"
    VALIDATION = "validation"


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """A named collection of text documents split deterministically into train and validation.

    Multi-file text corpora are split by file, on a hash of each file's path relative to ``root``; single
    files, jsonl/parquet and saved datasets by record index. Neither depends on ``root`` itself."""

    name: str
    """``python-stdlib`` or the path it was opened from"""
    units: tuple[str, ...]
    """the files (or dataset path) it reads, in order (sorted by their path relative to ``root``)"""
    kind: str
    """``files``, ``jsonl``, ``parquet`` or ``hf-disk``"""
    val_fraction: float = 0.05
    """fraction of files (records for single-file and dataset corpora) held out for validation"""
    root: str | None = None
    """what the units are named relative to: the folder opened (the file itself for a single-file corpus);
    the split and the cache key see only relative paths. None: the folder of the first unit"""

    def relative(self, unit: str) -> str:
        """``unit``'s path relative to the corpus root, in POSIX form (what the split and the cache key read)."""
        root = Path(self.root) if self.root is not None else Path(self.units[0]).parent
        try:
            return Path(unit).relative_to(root).as_posix()
        except ValueError:
            raise ValueError(f"corpus unit {unit} is not under the corpus root {root}") from None

    @property
    def split_by_file(self) -> bool:
        """True when whole files are assigned to splits (a text corpus of several files)."""
        return self.kind == "files" and len(self.units) > 1

    def assignment(self) -> dict[str, Split]:
        """Relative path -> split of every file of a file-split corpus (empty when split by record)."""
        if not self.split_by_file:
            return {}
        return {
            rel: Split.VALIDATION if _is_validation(rel, self.val_fraction) else Split.TRAIN
            for rel in map(self.relative, self.units)
        }

    def documents(self, split: Split | str = Split.TRAIN) -> Iterator[str]:
        """Yield the documents of one split, in a fixed order."""
        split = Split(split)
        if self.split_by_file:
            assignment = self.assignment()
            for path in self.units:
                if assignment[self.relative(path)] is split:
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
        """A hash of everything that determines the documents of each split: the split rule, the kind, the
        validation fraction, and every file's relative path, position, split and contents (the cache key of
        tokenizers and token stores). Where the corpus lives is not part of it."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256()

        def field(*parts: object) -> None:  # length-prefixed, so no two inputs concatenate alike
            for part in parts:
                data = part if isinstance(part, bytes) else str(part).encode()
                h.update(len(data).to_bytes(8, "little") + data)

        field(_SPLIT_SCHEME, self.kind, repr(float(self.val_fraction)), len(self.units), self.split_by_file)
        assignment = self.assignment()
        for unit in self.units:
            p = Path(unit)
            rel = self.relative(unit)
            field("unit", rel, assignment[rel].value if assignment else "records")
            files = sorted(
                (q for q in p.rglob("*") if q.is_file()), key=lambda q: q.relative_to(p).as_posix()
            )
            for f in files if p.is_dir() else [p]:
                field("file", f.relative_to(p).as_posix() if p.is_dir() else "", file_sha256(f))
        return h.hexdigest()[:16]


def _is_validation(key: str, fraction: float) -> bool:
    # a hash of the file's relative path or the record's index (not the file's position, not its absolute
    # path): stable when files are added, the same wherever the corpus is copied
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


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files (no tests, no site-packages), sorted by relative path.
    ``root``: another copy of a standard library (default: the running interpreter's)."""
    root = Path(root) if root is not None else stdlib_root()
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _sorted_under(root: Path, files: list[Path]) -> tuple[str, ...]:
    return tuple(str(f) for f in sorted(files, key=lambda f: f.relative_to(root).as_posix()))


def open_corpus(source: str | Path, *, val_fraction: float = 0.05) -> Corpus:
    """Open ``python-stdlib``, a text/jsonl/parquet file, a folder of text files, or a saved HF dataset."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if str(source) == STDLIB:
        root = stdlib_root()
        files = stdlib_files(root)
        if not files:
            raise ValueError(f"no standard-library .py files found under {root}")
        return Corpus(
            name=STDLIB, units=tuple(map(str, files)), kind="files", val_fraction=val_fraction, root=str(root)
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {str(source)!r} does not exist (give a file, a folder, or {STDLIB!r})"
        )
    if path.is_dir():
        corpus = functools.partial(Corpus, name=str(path), val_fraction=val_fraction, root=str(path))
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return corpus(units=(str(path),), kind="hf-disk")
        jsonl = list(path.rglob("*.jsonl"))
        parquet = list(path.rglob("*.parquet"))
        if jsonl or parquet:
            kind, found = ("jsonl", jsonl) if jsonl else ("parquet", parquet)
            return corpus(units=_sorted_under(path, found), kind=kind)
        files = [
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in _TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise ValueError(f"folder {path} has no text files ({', '.join(sorted(_TEXT_SUFFIXES))})")
        return corpus(units=_sorted_under(path, files), kind="files")
    kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "files")
    return Corpus(name=str(path), units=(str(path),), kind=kind, val_fraction=val_fraction, root=str(path))
