"""Checkpoint folders: listed by step and verified against the sizes and SHA-256s their ``state.json``
recorded (writing them is `interplab.train.checkpoint`'s)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from interplab.integrity import check_file
from interplab.runs.names import CHECKPOINTS, CONFIG, MODEL_WEIGHTS, OPTIMIZER, RNG, STATE, checkpoint_step


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Every finished checkpoint folder under ``run_dir/checkpoints`` (temp folders of interrupted writes are
    ignored), by step. Not verified: see `verify_checkpoint`."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for p in root.iterdir():
            step = checkpoint_step(p.name)
            if step is not None and p.is_dir():
                out.append(Checkpoint(step, p))
    return sorted(out, key=lambda c: c.step)


MODEL_CHECKPOINT_FILES = (MODEL_WEIGHTS, CONFIG)
RESUME_FILES = (OPTIMIZER, RNG)


def verify_checkpoint(
    path: Path, *, need_optimizer: bool = True, required: Iterable[str] | None = None
) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not. ``required``: the files it
    must hold (default: a model checkpoint's, with the optimizer and RNG state when ``need_optimizer``)."""
    state_file = Path(path) / STATE
    if not state_file.is_file():
        return f"no {STATE} (interrupted write?)"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{STATE} is not valid JSON ({err})"
    hashes = state.get("sha256") if isinstance(state, dict) else None
    if not isinstance(hashes, dict):
        return f"{STATE} has no file hashes"
    if required is None:
        required = set(MODEL_CHECKPOINT_FILES) | (set(RESUME_FILES) if need_optimizer else set())
    missing = sorted(set(required) - set(hashes))
    if missing:
        return f"missing {', '.join(missing)}"
    sizes = state.get("sizes") or {}
    for name, digest in hashes.items():
        problem = check_file(Path(path) / name, {"sha256": digest, "size": sizes.get(name)})
        if problem is not None:
            return f"{name} {problem}"
    return None


def _checkpoints(
    path: Path, intact: bool, required: Iterable[str] | None, need_optimizer: bool
) -> list[Checkpoint]:
    found = list_checkpoints(path)
    if not intact:
        return found
    req = None if required is None else tuple(required)
    return [
        c for c in found if verify_checkpoint(c.path, need_optimizer=need_optimizer, required=req) is None
    ]
