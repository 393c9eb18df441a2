"""Checkpoints of a training run: ``RUN/checkpoints/step_XXXXXX/``, each a loadable interplab model folder
plus optimizer and RNG state, written atomically (a temp folder, then one rename).

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``): `interplab.load_model`
reads it directly. ``optimizer.safetensors`` and ``rng.safetensors`` hold what resuming needs, and
``state.json`` (written last, ``{kind: checkpoint, version, ...}``) holds the step, the counters and the size
and SHA-256 of every file, so a corrupt or truncated checkpoint is recognised and skipped, never loaded.
`write_checkpoint` is the same protocol for any content (SAE training checkpoints use it); `clean_stale_temps`
removes what interrupted writes left behind. The names, the listing and the verification of checkpoints are
`interplab.runs`' (`checkpoint_name`, `TrainRun.checkpoints(intact=...)`, `verify_checkpoint`); this module
writes and restores them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from interplab import runs
from interplab.integrity import sha256_file
from interplab.io import load_tensors, save_tensors
from interplab.model.transformer import Transformer
from interplab.runs import (
    CHECKPOINTS,
    MODEL_WEIGHTS,
    OPTIMIZER,
    RNG,
    STATE,
    Checkpoint,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    verify_checkpoint,
)

__all__ = [
    "CHECKPOINTS",
    "Checkpoint",
    "checkpoint_dir",
    "clean_stale_temps",
    "latest_good_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "write_checkpoint",
]

_TMP, _OLD = (
    ".tmp-",
    ".old-",
)  # interrupted writes: ``.tmp-step_N-PID`` (new, unfinished), ``.old-step_N-PID``


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / checkpoint_name(step)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Transformer,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> Path:
    """Write checkpoint ``step`` atomically; an existing checkpoint of the same step is replaced only once
    the new one is complete."""

    def write(tmp: Path) -> dict[str, Any]:
        model.save(tmp)
        if optimizer is None:
            return state
        tensors, groups = _flatten_optimizer(optimizer.state_dict())
        save_tensors(tmp / OPTIMIZER, tensors)
        save_tensors(tmp / RNG, global_rng_state())
        return {**state, "param_groups": groups}

    return write_checkpoint(checkpoint_dir(run_dir, step), step, write)


def write_checkpoint(final: Path, step: int, write: Callable[[Path], dict[str, Any]]) -> Path:
    """The atomic checkpoint protocol, for any content: ``write(tmp)`` fills a temp folder (sub-folders allowed)
    and returns the state to record; then ``state.json`` (with the step, that state and the size and SHA-256
    of every file) is written last and the folder is renamed into place. An existing checkpoint of the same
    name is replaced only once the new one is complete."""
    final = Path(final)
    tmp = final.parent / f"{_TMP}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        state = write(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        rel = [p.relative_to(tmp).as_posix() for p in files]
        runs.write_json(
            tmp / STATE,
            runs.Kind.CHECKPOINT,
            {
                "step": step,
                **state,
                "sha256": {r: sha256_file(p) for r, p in zip(rel, files, strict=True)},
                "sizes": {r: p.stat().st_size for r, p in zip(rel, files, strict=True)},
            },
        )
        if final.exists():
            old = final.parent / f"{_OLD}{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def global_rng_state() -> dict[str, torch.Tensor]:
    """torch's global CPU (and CUDA) generator states, to store in ``rng.safetensors``."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def set_global_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state(rng["cuda"])


def clean_stale_temps(run_dir: str | Path) -> list[str]:
    """Remove the temp folders that interrupted checkpoint writes left in ``RUN/checkpoints`` (what each did).

    Safe: folders of a process that is still alive are left alone; a previous checkpoint that was moved aside
    to be replaced (``.old-step_N-PID``) is put back when its replacement never arrived, else removed."""
    root = Path(run_dir) / CHECKPOINTS
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        kind = _TMP if p.name.startswith(_TMP) else _OLD if p.name.startswith(_OLD) else None
        if kind is None or not p.is_dir():
            continue
        name, _, pid = p.name[len(kind) :].rpartition("-")
        if checkpoint_step(name) is None or not pid.isdigit() or _alive(int(pid)):
            continue
        final = root / name
        if kind == _OLD and not final.exists():
            p.rename(final)
            done.append(f"restored {name} from {p.name} (its replacement was interrupted)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by an interrupted checkpoint write)")
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes nothing while it cleans
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def latest_good_checkpoint(
    run_dir: Path, *, required: Iterable[str] | None = None
) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """The newest resumable checkpoint, and the newer ones that were skipped with their reasons."""
    skipped: list[tuple[Checkpoint, str]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        reason = verify_checkpoint(ckpt.path, need_optimizer=True, required=required)
        if reason is None:
            return ckpt, skipped
        skipped.append((ckpt, reason))
    return None, skipped


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore weights (in place), optimizer and RNG state from a verified checkpoint; return its state.json."""
    reason = verify_checkpoint(path, need_optimizer=optimizer is not None)
    if reason is not None:
        raise ValueError(f"checkpoint {path} cannot be loaded: {reason}")
    state = json.loads((path / STATE).read_text())
    weights = load_tensors(path / MODEL_WEIGHTS)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name not in weights:
                raise KeyError(f"{path}: missing weight {name!r}")
            tensor.copy_(weights[name])
    if optimizer is not None:
        tensors = load_tensors(path / OPTIMIZER)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
        set_global_rng_state(load_tensors(path / RNG))
    return state


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state as safetensors-ready tensors and JSON param groups (`load_optimizer_state` inverts)."""
    return _flatten_optimizer(optimizer.state_dict())


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(tensors, groups))


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
