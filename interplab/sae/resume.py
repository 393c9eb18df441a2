"""The SAE training run folder: claim it (refusing one that holds a different run), checkpoint every trainer's
full state with the atomic, checksummed protocol of `interplab.train.checkpoint`, and resume bit-exactly.

Layout of ``RUN/``::

    config.json                 {kind: sae_train, version, saes: {name: SAE config}, train: {name: SAETrainConfig},
                                 data: what the activations are (cache identity, or model + corpus)}
    log.jsonl                   one row per logged step and SAE (truncated to the resumed step on resume)
    checkpoints/step_N/NAME/    the SAE in SAELens' layout (loadable) + trainer.safetensors (raw SAE state,
                                Adam moments, firing counters, resampling generator)
    checkpoints/step_N/rng.safetensors, state.json (step, tokens, per-SAE scalars, sizes + SHA-256s; last)
    saes/NAME/, train_summary.json   the finished SAEs

Every name is `interplab.runs`' (``SAERun.open(RUN)`` reads the folder); checkpoint folders are named by
`interplab.runs.checkpoint_name` like a training run's (``step_000120``), and folders with more digits that
older runs wrote still resume.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file

from interplab.io import save_tensors
from interplab.runs import (
    CHECKPOINTS,
    CONFIG,
    EVAL,
    LOG,
    RNG,
    SAES,
    STATE,
    TRAIN_SUMMARY,
    VERSIONS,
    Kind,
    RunError,
    read_json,
    write_json,
)
from interplab.sae.base import SAE
from interplab.sae.train_config import SAETrainConfig
from interplab.train.checkpoint import (
    checkpoint_dir,
    clean_stale_temps,
    global_rng_state,
    latest_good_checkpoint,
    list_checkpoints,
    set_global_rng_state,
    write_checkpoint,
)
from interplab.train.distributed import from_rank0, is_main
from interplab.train.log import read_log, truncate_log

if TYPE_CHECKING:
    from interplab.sae.train import _Trainer  # sae.train imports this module

RUN_KIND = Kind.SAE_TRAIN
RUN_VERSION = VERSIONS[Kind.SAE_TRAIN]
TRAINER_STATE = "trainer.safetensors"
# fields of a SAETrainConfig that do not change what is trained (a resume may change them)
_NOT_IDENTITY = ("checkpoint_every",)
# what a run folder may hold: only these are removed by overwrite
_RUN_FILES = (CONFIG, LOG, TRAIN_SUMMARY, SAES, CHECKPOINTS, EVAL)


def run_identity(
    saes: Mapping[str, SAE], cfgs: Mapping[str, SAETrainConfig], data: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The JSON ``config.json`` of a run: everything that determines the trained SAEs."""
    train = {}
    for name, cfg in cfgs.items():
        fields = {k: v for k, v in vars(cfg).items() if k not in _NOT_IDENTITY}
        train[name] = fields
    ident = {
        "kind": RUN_KIND.value,
        "version": RUN_VERSION,
        "saes": {n: s.cfg.to_dict() for n, s in saes.items()},
        "train": train,
        "data": dict(data or {}),
    }
    return json.loads(json.dumps(ident, default=str))


def start_run(
    run: Path | None,
    identity: dict[str, Any],
    trainers: Sequence[Any],
    *,
    resume: bool,
    overwrite: bool,
    kind: Kind = RUN_KIND,
    files: Sequence[str] = _RUN_FILES,
) -> tuple[int, int, list[dict[str, Any]]]:
    """Claim ``run`` (rank 0, `claim_run`) and restore ``trainers`` from its newest intact checkpoint when it
    holds this same run (every rank, once rank 0 has checked and cleaned the folder): (step, tokens, events to
    log). Step 0 with no folder, or a new run. Every rank calls it (a collective under torchrun); rank 0's
    refusal is raised on rank 0, a RuntimeError on the others."""
    continuing, error, events = False, None, []
    if run is not None and is_main():
        try:
            continuing = claim_run(run, identity, resume=resume, overwrite=overwrite, kind=kind, files=files)
            events += clean_run(run) if continuing else []
        except (ValueError, OSError) as err:
            error = err
    # every rank learns rank 0's decision (after it checked and cleaned the folder) before reading checkpoints
    decision = from_rank0(2 if error is not None else int(continuing))
    if error is not None:
        raise error
    if decision == 2:
        raise RuntimeError("rank 0 refused the run folder (see its error)")
    if run is None or decision != 1:
        return 0, 0, events
    start, tokens, found = resume_training(run, trainers)
    return start, tokens, events + found


def claim_run(
    run: Path,
    identity: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    kind: Kind = RUN_KIND,
    files: Sequence[str] = _RUN_FILES,
) -> bool:
    """Make ``run`` this run's folder. True if it already holds this run (to continue from its checkpoints).

    A folder holding a different run is refused, naming the first difference, unless ``overwrite`` (then the
    earlier run's files are removed); a non-empty folder that is not an SAE run is never written to. ``kind``
    and ``files`` (what overwrite removes) let another trainer's runs (a CLT's) share this protocol."""
    cfg_file = run / CONFIG
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"{run} is a file, not a run folder: choose another output folder")
    old = None
    if cfg_file.is_file():
        try:
            old = read_json(cfg_file)
        except RunError:
            old = {}
    if old is None or old.get("kind") != kind.value:
        leftovers = [p for p in run.iterdir() if p.name.endswith(".tmp")] if run.is_dir() else []
        if run.is_dir() and any(p not in leftovers for p in run.iterdir()):
            raise ValueError(
                f"{run} is not empty and does not hold {kind.label}: choose another output folder"
            )
        run.mkdir(parents=True, exist_ok=True)
        _write_config(run, identity, kind)
        return False
    diff = _first_difference(old, identity)
    if diff is None and resume:
        return True
    if not overwrite:
        why = f"was written by another run ({diff})" if diff else "already holds this run and resume is off"
        raise ValueError(
            f"{run} {why}: use another output folder (a new --out), or overwrite=True (--overwrite) to "
            "replace it"
        )
    for name in files:
        p = run / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in run.glob("training_*.html"):
        p.unlink()
    _write_config(run, identity, kind)
    return False


def _write_config(run: Path, identity: dict[str, Any], kind: Kind = RUN_KIND) -> None:
    write_json(run / CONFIG, kind, identity)


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            sub = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if sub is not None:
                return sub
        return None
    if old != new:
        return f"{where}={json.dumps(old)}, this run asks for {json.dumps(new)}"
    return None


def save_training_checkpoint(run: Path, step: int, tokens: int, trainers: Sequence[_Trainer]) -> Path:
    """Checkpoint ``step`` of a joint run: each trainer's loadable SAE and full state, atomically."""

    def write(tmp: Path) -> dict[str, Any]:
        scalars = {}
        for t in trainers:
            t.sae.save(tmp / t.name)
            tensors, scalars[t.name] = t.state_dict()
            save_tensors(tmp / t.name / TRAINER_STATE, tensors)
        save_tensors(tmp / RNG, global_rng_state())
        return {"tokens": tokens, "trainers": scalars}

    return write_checkpoint(checkpoint_dir(run, step), step, write)


def resume_training(run: Path, trainers: Sequence[_Trainer]) -> tuple[int, int, list[dict[str, Any]]]:
    """Restore every trainer from the newest intact checkpoint of ``run``: (step, tokens, events). Step 0
    when there is none; the events name skipped (corrupt or incomplete) checkpoints."""
    required = [f"{t.name}/{TRAINER_STATE}" for t in trainers] + [RNG]
    ckpt, bad = latest_good_checkpoint(run, required=required)
    events: list[dict[str, Any]] = [
        {"event": "skipped_checkpoint", "reason": f"{c.path.name}: {why}"} for c, why in bad
    ]
    if ckpt is None:
        return 0, 0, events
    state = read_json(ckpt.path / STATE)
    for t in trainers:
        t.load_state_dict(load_file(str(ckpt.path / t.name / TRAINER_STATE)), state["trainers"][t.name])
    set_global_rng_state(load_file(str(ckpt.path / RNG)))
    events.append({"event": "resume", "step": ckpt.step})
    return ckpt.step, int(state["tokens"]), events


def clean_run(run: Path) -> list[dict[str, Any]]:
    """Remove the temp folders of interrupted checkpoint writes (log events saying what was done)."""
    return [{"event": "cleaned", "what": item} for item in clean_stale_temps(run)]


def restart_log(run: Path, step: int) -> list[dict[str, Any]]:
    """Drop the log rows after ``step`` (they are trained again) and return the metric rows kept."""
    truncate_log(run, step)
    return [r for r in read_log(run) if "sae" in r]


def prune_checkpoints(run: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (older ones only ever serve a resume that a newer one serves)."""
    for c in list_checkpoints(run)[:-keep]:
        shutil.rmtree(c.path, ignore_errors=True)
