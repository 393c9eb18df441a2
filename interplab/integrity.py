"""File checksums and content fingerprints: what was written is what is read.

A folder written by interplab (a model, an SAE) carries ``checksums.json``: the size and SHA-256 of each of its
files, recorded at write. Loading verifies them (the size first, which catches truncation for free) and names
the file that does not match, so a flipped byte never loads silently. A folder without ``checksums.json``
(written by another tool, or by an older interplab) loads unverified.

`tensors_fingerprint` hashes tensors themselves (names, shapes, dtypes and bytes): the identity of a model or an
SAE in memory, recorded in manifests so a resumed job can tell whether it is still reading the same model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from interplab.io import atomic_write_json, file_sha256

CHECKSUMS = "checksums.json"
_KIND = "checksums"
_VERSION = 1
# (path, inode, size, mtime_ns) -> digest for files not modified in the last second (a file changed within the
# timestamp granularity could keep its mtime, so such files are always hashed again)
_MEMO: dict[tuple[str, int, int, int], str] = {}
_MEMO_MIN_AGE_S = 1.0


class IntegrityError(ValueError):
    """A file whose size or checksum differs from the one recorded when it was written."""


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of a file, remembered for files unchanged since they were last hashed in this process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _MEMO:
        return _MEMO[key]
    digest = file_sha256(path)
    if time.time() - st.st_mtime_ns / 1e9 > _MEMO_MIN_AGE_S:
        _MEMO[key] = digest
    return digest


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def check_file(path: Path, record: Mapping[str, Any]) -> str | None:
    """None if ``path`` matches ``record`` (size, then SHA-256), else what is wrong with it."""
    if not path.is_file():
        return "is missing"
    size = record.get("size")
    if size is not None and path.stat().st_size != size:
        return f"is corrupt or truncated ({path.stat().st_size} bytes; {size} were written)"
    if sha256_file(path) != record["sha256"]:
        return "is corrupt or truncated (its SHA-256 differs from the one recorded when it was written)"
    return None


def record_checksums(folder: str | Path, names: Iterable[str]) -> None:
    """Write ``folder/checksums.json`` for the files ``names`` (relative to ``folder``) that exist."""
    folder = Path(folder)
    files = {n: file_record(folder / n) for n in sorted(set(names)) if (folder / n).is_file()}
    atomic_write_json(folder / CHECKSUMS, {"kind": _KIND, "version": _VERSION, "files": files})


def forget_checksums(folder: str | Path) -> None:
    """Remove ``folder/checksums.json`` before its files are rewritten (a stale record would fail them)."""
    (Path(folder) / CHECKSUMS).unlink(missing_ok=True)


def verify_checksums(folder: str | Path) -> bool:
    """Check every file recorded in ``folder/checksums.json``; raise `IntegrityError` naming the first that does
    not match. Returns False (nothing checked) when the folder has no ``checksums.json``."""
    folder = Path(folder)
    file = folder / CHECKSUMS
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text())
        files = data["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise IntegrityError(f"{file} is unreadable ({err}): the folder's files cannot be verified") from None
    for name, rec in files.items():
        problem = check_file(folder / name, rec)
        if problem is not None:
            raise IntegrityError(
                f"{folder / name} {problem}; restore it, or delete {file} to load it unverified"
            )
    return True


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor], extra: Any = None) -> str:
    """A SHA-256 (first 16 hex digits) of named tensors (names, dtypes, shapes, bytes) and a JSON-able ``extra``
    (e.g. the config): equal exactly when the weights are bit-identical."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


def module_fingerprint(module: torch.nn.Module) -> str:
    """`tensors_fingerprint` of a module's state dict and its ``cfg`` (as a dict) where it has one."""
    cfg = getattr(module, "cfg", None)
    extra = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else None
    return tensors_fingerprint(dict(module.state_dict()), extra)
