"""Checkpoints of a training run: ``RUN/checkpoints/step_XXXXXX/``, each a loadable interplab model folder
plus optimizer and RNG state, written atomically (a temp folder, then one rename).

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``): `interplab.load_model`
reads it directly. ``optimizer.safetensors`` and ``rng.safetensors`` hold what resuming needs, and
``state.json`` (written last) holds the step, the counters and a SHA-256 of every file, so a corrupt or
truncated checkpoint is recognised and skipped, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interplab.io import atomic_write_json, save_tensors

CHECKPOINTS = "checkpoints"
_PREFIX = "step_"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:06d}"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Every finished checkpoint folder of a run (temp folders of interrupted writes are ignored), by step."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit():
                out.append(Checkpoint(int(p.name[len(_PREFIX) :]), p))
    return sorted(out, key=lambda c: c.step)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> Path:
    """Write checkpoint ``step`` atomically; an existing checkpoint of the same step is replaced only once
    the new one is complete."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save(tmp)
        if optimizer is not None:
            tensors, groups = _flatten_optimizer(optimizer.state_dict())
            save_tensors(tmp / "optimizer.safetensors", tensors)
            state = {**state, "param_groups": groups}
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_tensors(tmp / "rng.safetensors", rng)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / "state.json", {"step": step, **state, "sha256": files})
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint(path: Path, *, need_optimizer: bool = True) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    state_file = path / "state.json"
    if not state_file.is_file():
        return "no state.json (interrupted write?)"
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        return f"state.json is not valid JSON ({err})"
    hashes = state.get("sha256")
    if not isinstance(hashes, dict):
        return "state.json has no file hashes"
    needed = {"model.safetensors", "config.json"} | (
        {"optimizer.safetensors", "rng.safetensors"} if need_optimizer else set()
    )
    missing = sorted(needed - set(hashes))
    if missing:
        return f"missing {', '.join(missing)}"
    for name, digest in hashes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} is corrupt or truncated (checksum mismatch)"
    return None


def latest_good_checkpoint(run_dir: Path) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """The newest resumable checkpoint, and the newer ones that were skipped with their reasons."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        reason = verify_checkpoint(ckpt.path, need_optimizer=True)
        if reason is None:
            return ckpt, skipped
        skipped.append((ckpt, reason))
    return None, skipped


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore weights (in place), optimizer and RNG state from a verified checkpoint; return its state.json."""
    from safetensors.torch import load_file

    reason = verify_checkpoint(path, need_optimizer=optimizer is not None)
    if reason is not None:
        raise ValueError(f"checkpoint {path} cannot be loaded: {reason}")
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name not in weights:
                raise KeyError(f"{path}: missing weight {name!r}")
            tensor.copy_(weights[name])
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):
                torch.cuda.set_rng_state(rng["cuda"])
    return state


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}
