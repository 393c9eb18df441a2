"""Checkpoints of crosscoder training, so a long model diff survives an interruption and resumes bit-exactly
(the protocol of SAE training's `interplab.sae.resume`: `interplab.train.checkpoint.write_checkpoint`'s atomic,
checksummed folders).

Layout of ``FOLDER/checkpoints/step_N/``: ``crosscoder.safetensors`` (parameters and the inference threshold),
``trainer.safetensors`` (Adam moments and steps, each latent's tokens since it last fired), ``rng.safetensors``
(torch's generators) and ``state.json`` (step, tokens, the log so far, the run's identity; sizes and SHA-256s of
the files; written last). A checkpoint whose identity (crosscoder config, training config, data) differs from
the run asking to resume is refused with the first difference named, never silently mixed in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from interplab.io import save_tensors
from interplab.runs import RNG, STATE, read_json
from interplab.train.checkpoint import (
    checkpoint_dir,
    global_rng_state,
    latest_good_checkpoint,
    list_checkpoints,
    set_global_rng_state,
    write_checkpoint,
)

CC_STATE = "crosscoder.safetensors"
TRAINER_STATE = "trainer.safetensors"
REQUIRED = (CC_STATE, TRAINER_STATE, RNG)


@dataclass
class TrainState:
    """Where crosscoder training stands after ``step`` steps."""

    step: int
    tokens: int
    since_fired: Tensor
    history: list[dict[str, float]]


def save_crosscoder_checkpoint(
    folder: Path,
    state: TrainState,
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    identity: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Checkpoint ``state`` with the crosscoder ``module`` and its Adam ``opt`` under ``folder/checkpoints``
    (atomically); older checkpoints beyond the newest ``keep`` are removed once the new one is in place."""

    def write(tmp: Path) -> dict[str, Any]:
        save_tensors(tmp / CC_STATE, {k: v.detach().contiguous() for k, v in module.state_dict().items()})
        tensors = {"since_fired": state.since_fired}
        for i, p in enumerate(module.parameters()):
            s = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in s:
                    tensors[f"adam.{i}.{key}"] = torch.as_tensor(s[key]).detach().clone().contiguous()
        save_tensors(tmp / TRAINER_STATE, tensors)
        save_tensors(tmp / RNG, global_rng_state())
        return {"tokens": state.tokens, "history": state.history, "identity": identity}

    path = write_checkpoint(checkpoint_dir(folder, state.step), state.step, write)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return path


def resume_crosscoder(
    folder: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, identity: dict[str, Any]
) -> TrainState | None:
    """Restore ``module`` and ``opt`` from the newest intact checkpoint under ``folder/checkpoints`` and return
    its state (None when there is none). Raises ValueError when it belongs to a different run."""
    ckpt, _bad = latest_good_checkpoint(folder, required=REQUIRED)
    if ckpt is None:
        return None
    state = read_json(ckpt.path / STATE)
    if state.get("identity") != identity:
        diff = _first_difference(state.get("identity"), identity)
        raise ValueError(
            f"{ckpt.path} is a checkpoint of a different crosscoder run ({diff}); use another output folder or "
            f"remove {folder / 'checkpoints'} to start over"
        )
    module.load_state_dict(load_file(str(ckpt.path / CC_STATE)))
    tensors = load_file(str(ckpt.path / TRAINER_STATE))
    for i, p in enumerate(module.parameters()):
        s = {
            key: tensors[f"adam.{i}.{key}"]
            for key in ("exp_avg", "exp_avg_sq", "step")
            if f"adam.{i}.{key}" in tensors
        }
        if s:
            opt.state[p] = s
    set_global_rng_state(load_file(str(ckpt.path / RNG)))
    return TrainState(
        step=ckpt.step,
        tokens=int(state["tokens"]),
        since_fired=tensors["since_fired"],
        history=[{k: float(v) for k, v in row.items()} for row in state["history"]],
    )


def _first_difference(old: Any, new: Any, where: str = "identity") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{where}.{key}")
    return f"{where}: the checkpoint has {json.dumps(old)}, this run asks for {json.dumps(new)}"
