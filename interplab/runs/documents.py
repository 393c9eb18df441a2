"""JSON documents: written with their ``kind`` and ``version``, read back checking them; documents written
before ``kind`` existed are recognised here (`detect_document`), and nowhere else. ``log.jsonl`` lines."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from interplab.io import atomic_write_json, atomic_write_text
from interplab.runs.kinds import VERSIONS, Kind, RunError, _as_kind
from interplab.runs.names import (
    CONFIG,
    DIFF_JSON,
    FORMATION_JSON,
    GRADIENT_INDEX,
    LOG,
    MANIFEST,
    REPORT,
    SAE_CFG,
    STATE,
    TRAIN_SUMMARY,
)


def write_json(
    path: str | Path, kind: Kind | str, data: Mapping[str, Any], *, version: int | None = None
) -> Path:
    """Write ``{kind, version, **data}`` atomically. ``version`` defaults to ``data["version"]`` (configs carry
    their own) and then to the kind's current version (`VERSIONS`)."""
    kind = _as_kind(kind)
    if data.get("kind") not in (None, kind.value):
        raise ValueError(f"{path}: data says kind {data['kind']!r} but is written as {kind.value!r}")
    ver = version if version is not None else data.get("version", VERSIONS[kind])
    body = {k: v for k, v in data.items() if k not in ("kind", "version")}
    atomic_write_json(path, {"kind": kind.value, "version": ver, **body})
    return Path(path)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path} is not readable JSON ({err})") from None


def read_json(
    path: str | Path, expect: Kind | str | Iterable[Kind | str] | None = None, *, strip: bool = False
) -> dict[str, Any]:
    """The JSON document in ``path`` with its ``kind`` (recognised by `detect_document` when an older
    interplab wrote it without one). With ``expect``, a document of another kind, or of a newer version than
    this interplab reads, raises `RunError` saying what it is. ``strip`` drops ``kind`` and ``version``."""
    path = Path(path)
    data = _load(path)
    if not isinstance(data, dict):
        raise RunError(f"{path} holds a JSON {type(data).__name__}, not an object")
    kind = detect_document(path.name, data)
    if expect is not None:
        wanted = [_as_kind(expect)] if isinstance(expect, (Kind, str)) else [_as_kind(k) for k in expect]
        if kind not in wanted:
            what = kind.label if kind is not None else "not a document interplab wrote"
            raise RunError(f"{path} is {what}; expected {' or '.join(k.label for k in wanted)}")
    if kind is not None and isinstance(data.get("version"), int) and data["version"] > VERSIONS[kind]:
        raise RunError(
            f"{path} is {kind.label} of version {data['version']}, written by a newer interplab "
            f"(this one reads up to version {VERSIONS[kind]}): upgrade interplab"
        )
    if strip:
        return {k: v for k, v in data.items() if k not in ("kind", "version")}
    return data


_TRAIN_KEYS = {"model", "data", "optim", "steps", "batch_size"}
_COMMANDS = {  # config.json of analysis runs before kind: {"command": ..., options}
    "patch": Kind.PATCH,
    "heads": Kind.HEADS,
    "lens": Kind.LENS,
    "scrub": Kind.SCRUB,
    "discover": Kind.DISCOVERY,
}
_GRADIENTS_FORMAT = "interplab-gradients"  # gradient recordings before kind: {"format": ..., ...}


def detect_document(name: str, data: Mapping[str, Any]) -> Kind | None:
    """The kind of a JSON document named ``name``: its ``kind`` field, else (written by an older interplab,
    or by another tool) what its keys say. None when it is none of interplab's."""
    raw = data.get("kind")
    if isinstance(raw, str):
        try:
            return Kind(raw)
        except ValueError:
            return None
    if name == CONFIG:
        if data.get("format") == "interplab":
            return Kind.MODEL
        if "model_type" in data:
            return Kind.HF_MODEL
        if _TRAIN_KEYS <= set(data):
            return Kind.TRAIN
        if isinstance(data.get("command"), str) and data["command"] in _COMMANDS:
            return _COMMANDS[data["command"]]
        if data.get("format") == _GRADIENTS_FORMAT:
            return Kind.GRADIENTS
        return None
    if name == SAE_CFG and {"d_in", "d_sae"} <= set(data):
        return Kind.SAE
    if name == MANIFEST and {"hooks", "shards"} <= set(data):  # version-1 caches wrote no kind
        return Kind.ACTIVATION_CACHE
    if name == TRAIN_SUMMARY and {"tokens", "steps", "final"} <= set(data):
        return Kind.SAE_TRAIN_SUMMARY
    if name == STATE and "step" in data and "sha256" in data:
        return Kind.CHECKPOINT
    if name == REPORT and "tokens_per_s" in data and "step" in data:
        return Kind.TRAIN_REPORT
    if name == REPORT and ("ce_loss_recovered" in data or isinstance(data.get("saes"), list)):
        return Kind.SAE_EVAL  # `sae eval` before kinds: one SAE's report, or a run's list of them
    if name == REPORT and {"target", "top"} <= set(data):
        return Kind.ATTRIBUTION
    if name == REPORT and data.get("experiment") in ("digits-split", "era"):
        return Kind.ROUTING
    if name == GRADIENT_INDEX and data.get("format") == _GRADIENTS_FORMAT:
        return Kind.GRADIENT_INDEX
    if name == FORMATION_JSON:
        return Kind.FORMATION
    if name == DIFF_JSON and {"before", "after", "relative_norm"} <= set(data):
        return Kind.MODEL_DIFF  # `sae diff` before its diff.json carried a kind
    return None


def write_log(folder: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``folder/log.jsonl`` at once (atomically), one JSON object per row: the log of a command that
    writes its folder only when it has finished (`read_log` reads it back)."""
    file = Path(folder) / LOG
    atomic_write_text(file, "".join(json.dumps(row) + "\n" for row in rows))
    return file


def read_log(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of ``folder/log.jsonl`` (empty when there is none); a torn last line (a job killed mid-write)
    is skipped."""
    file = Path(folder) / LOG
    if not file.is_file():
        return []
    rows = []
    lines = file.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RunError(f"{file} line {i + 1} is not JSON") from None
    return rows
