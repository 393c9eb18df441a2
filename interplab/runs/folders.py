"""What a folder is: `detect` (the one place folders are recognised, old ones included), `describe` (for
error messages), the guard of output folders (`check_out`) and where the SAEs in a folder are."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interplab.runs.checkpoints import list_checkpoints
from interplab.runs.dictionaries import DICTIONARY_KINDS, TAKEN_BY, dictionary_info
from interplab.runs.documents import _load, detect_document
from interplab.runs.kinds import Kind, RunError, _as_kind
from interplab.runs.names import (
    _SQLITE_MAGIC,
    CALIBRATION_JSON,
    CONFIG,
    CROSSCODER_DIR,
    CROSSCODER_WEIGHTS,
    DIFF_JSON,
    FINAL,
    FORMATION_JSON,
    MANIFEST,
    REPORT,
    SAE_CFG,
    SAE_DIR,
    SAE_WEIGHTS,
    SAES,
    STATE,
)


@dataclass(frozen=True)
class Reader:
    """How `detect` looks at the disk. The default reads anything; the web app passes one that stays inside
    its ``--runs`` folders and refuses files over a size limit."""

    is_file: Callable[[Path], bool] = Path.is_file
    is_dir: Callable[[Path], bool] = Path.is_dir
    read_json: Callable[[Path], Any] = field(default=lambda p: _load(p))
    read_head: Callable[[Path, int], bytes | None] = field(default=lambda p, n: _head(p, n))


def _head(path: Path, n: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


_DEFAULT = Reader()


def _doc_kind(path: Path, reader: Reader) -> Kind | None:
    if not reader.is_file(path):
        return None
    try:
        data = reader.read_json(path)
    except RunError:
        return None
    return detect_document(path.name, data) if isinstance(data, dict) else None


def is_sqlite(path: Path, reader: Reader = _DEFAULT) -> bool:
    return reader.is_file(path) and reader.read_head(path, len(_SQLITE_MAGIC)) == _SQLITE_MAGIC


def detect(path: str | Path, reader: Reader = _DEFAULT) -> Kind | None:
    """What ``path`` is (a `Kind`), or None when it is none of the kinds interplab writes or reads.

    The one place where folders are recognised, including those written before ``kind`` existed: a folder's
    ``config.json`` (or ``manifest.json``, ``cfg.json``, ``report.json``, ``formation.json``,
    ``calibration.json``, ``diff.json``) says what it is; an SAE or crosscoder folder needs its weights beside its
    ``cfg.json``; a checkpoint is a model folder with a ``state.json``; a feature database is an SQLite file."""
    path = Path(path)
    if reader.is_file(path):
        if is_sqlite(path, reader):
            return Kind.FEATURE_DB
        return _doc_kind(path, reader)
    if not reader.is_dir(path):
        return None
    kind = _doc_kind(path / CONFIG, reader)
    if kind is Kind.MODEL and reader.is_file(path / STATE):
        return Kind.CHECKPOINT
    if kind is not None:
        return kind
    for name in (MANIFEST, SAE_CFG, REPORT, FORMATION_JSON, CALIBRATION_JSON, DIFF_JSON):
        kind = _doc_kind(path / name, reader)
        weights = _WEIGHTS.get(kind) if kind is not None else None
        if weights is not None and not reader.is_file(path / weights):
            continue
        if kind is not None:
            return kind
    return None


_WEIGHTS = {Kind.SAE: SAE_WEIGHTS, Kind.CROSSCODER: CROSSCODER_WEIGHTS}
"""the weights file a dictionary folder needs beside its cfg.json to be one (a cfg.json alone is not)"""


def describe(path: str | Path) -> str:
    """One phrase for error messages: what ``path`` is (``"a training run (12 checkpoints, no final/ yet)"``)."""
    path = Path(path)
    if not path.exists():
        return "missing (no such file or folder)"
    kind = detect(path)
    if kind is None:
        if path.is_file():
            return "a file that is none of interplab's"
        names = sorted(p.name for p in path.iterdir())[:6]
        if not names:
            return "an empty folder"
        return f"a folder that is none of interplab's (it holds {', '.join(names)})"
    if kind is Kind.TRAIN:
        n = len(list_checkpoints(path))
        final = "final/" if (path / FINAL / CONFIG).is_file() else "no final/ yet"
        return f"{kind.label} ({n} checkpoint{'s' * (n != 1)}, {final})"
    if kind is Kind.SAE_TRAIN:
        names = sorted(sae_folders(path))
        return f"{kind.label} (SAEs: {', '.join(names) or 'none finished yet'})"
    if kind is Kind.DT_TRAIN:
        n = len(list_checkpoints(path))
        final = "final/" if detect(path / FINAL) is Kind.DT_MODEL else "no final/ yet"
        return f"{kind.label} ({n} checkpoint{'s' * (n != 1)}, {final})"
    if kind in DICTIONARY_KINDS:
        try:
            return f"{kind.label} ({dictionary_info(path, kind).summary()})"
        except RunError:
            return kind.label
    if kind is Kind.MODEL_DIFF:
        return f"{kind.label} ({_diff_phrase(path)})"
    return kind.label


def _diff_phrase(path: Path) -> str:
    try:
        data = _load(path / DIFF_JSON)
        counts = data.get("counts") or {}
        changes = ", ".join(f"{counts[k]} {k}" for k in ("new", "lost", "shared") if k in counts)
        where = f"{data.get('before')} -> {data.get('after')}"
        formation = data.get("formation") or {}
        step = formation.get("formation_step")
    except (RunError, AttributeError, TypeError):
        return "unreadable diff.json"
    has = "crosscoder/" if detect(path / CROSSCODER_DIR) is Kind.CROSSCODER else "no crosscoder/"
    if step is not None:
        has += f"; the formation (step {step}) {'between' if formation.get('brackets') else 'outside'} them"
    return f"{where}: {changes or 'no counts'}; {has}"


def not_an_sae(path: str | Path) -> str | None:
    """For a path that is another dictionary, or a folder of one (a crosscoder, a model diff, a CLT or a CLT
    training run), the error of a command that takes only SAEs: what it is and which commands take it; None
    for anything else."""
    path = Path(path)
    kind = detect(path)
    if kind not in TAKEN_BY:
        return None
    return f"{path} is {describe(path)}, not an SAE: {TAKEN_BY[kind]}"


def check_out(path: str | Path, kind: Kind | str, *also: Kind | str) -> Path:
    """``path`` as the output folder of a ``kind`` run, checked before anything is written: a folder that holds
    another kind of run (a training run given as ``--out`` of an analysis ...) is refused, saying what it is,
    since the new run would replace its ``config.json`` or ``report.json``. A new, empty or unrecognised folder,
    or one holding a run of ``kind`` (or of ``also``: rewritten), is fine."""
    path = Path(path)
    allowed = [_as_kind(k) for k in (kind, *also)]
    found = detect(path) if path.exists() else None
    if found is not None and found not in allowed:
        raise RunError(
            f"{path} is {describe(path)}: writing {allowed[0].label} there would replace its files; "
            "choose another output folder"
        )
    return path


def _expect(path: str | Path, kinds: Iterable[Kind], hint: str = "") -> tuple[Path, Kind]:
    path = Path(path)
    kinds = tuple(kinds)
    kind = detect(path)
    if kind not in kinds:
        raise RunError(
            f"{path} is {describe(path)}; expected {' or '.join(k.label for k in kinds)}"
            + (f" ({hint})" if hint else "")
        )
    return path, kind


def sae_folders(path: str | Path) -> dict[str, Path]:
    """The SAE folders a path holds, by name: an SAE folder is itself; an SAE training run gives its ``saes/*``;
    any other folder, the SAEs of the SAE runs (and SAE folders) directly inside it or in its ``sae/``."""
    path = Path(path)
    kind = detect(path)
    if kind is Kind.SAE:
        return {path.name: path}
    if kind is Kind.SAE_TRAIN:
        root = path / SAES
        return {p.name: p for p in sorted(root.iterdir()) if detect(p) is Kind.SAE} if root.is_dir() else {}
    out: dict[str, Path] = {}
    if path.is_dir():
        for child in sorted(path.iterdir()):
            ck = detect(child) if child.is_dir() else None
            if ck is Kind.SAE:
                out[child.name] = child
            elif ck is Kind.SAE_TRAIN or (ck is None and child.name == SAE_DIR):
                for name, p in sae_folders(child).items():
                    out.setdefault(name, p)
    return out


def pick_sae(path: str | Path, name: str | None = None) -> Path:
    """The one SAE folder ``path`` names (`sae_folders`); with several, ``name`` picks one, and without it the
    error lists them."""
    path = Path(path)
    found = sae_folders(path)
    if name is not None:
        if name in found:
            return found[name]
        other = not_an_sae(path) if not found else None
        raise RunError(other or f"{path} holds no SAE named {name!r}; it holds {', '.join(found) or 'none'}")
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        other = not_an_sae(path)
        raise RunError(
            other or f"{path} is {describe(path)}; expected an SAE folder or an SAE training run holding one"
        )
    raise RunError(
        f"{path} holds {len(found)} SAEs ({', '.join(found)}): name one (e.g. {next(iter(found.values()))})"
    )
