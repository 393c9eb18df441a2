"""Training a `DecisionTransformer` offline on trajectories: windows, the loop, the run folder, presets.

`trajectory_windows` cuts training windows of ``context`` steps out of a `Trajectories` data set: each ends at
a step drawn uniformly over all steps, starts at most ``context - 1`` steps earlier but never before its
episode's first step, and is left-padded (``mask`` False) to ``context`` steps. `train_dt` minimises the
cross-entropy of the taken actions at the real steps, with AdamW, linear warmup and cosine decay, gradient
clipping, and writes a run folder (`interplab.runs.DTTrainRun`)::

    RUN/config.json        {kind: dt_train, version, model: DTConfig, train: DTTrainConfig, data: summary}
    RUN/log.jsonl          one row per logged step (loss, lr, tokens/s; val_loss and val_accuracy on eval steps)
    RUN/checkpoints/step_N/    a DT model folder (save_dt) + optimizer and RNG state + state.json (written last)
    RUN/final/             the trained model (save_dt)
    RUN/report.json        {kind: dt_train_report, ...}

Checkpoints follow `interplab.train.config.CheckpointConfig` (log-spaced: dense early). The batch of step s is
a function of the seed and s alone, so a run stopped and resumed from a checkpoint is bit-identical to one that
ran through. Under ``torchrun --nproc_per_node N`` every process trains on its rows of the same global batch
and gradients are averaged (`interplab.train.distributed`); rank 0 writes the folder.

>>> model_cfg, train_cfg = dt_preset("memory-dt-tiny")
>>> model_cfg.context, train_cfg.steps
(12, 8000)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab import runs
from interplab.io import save_tensors
from interplab.rl.labels import decision_steps
from interplab.rl.model import DecisionTransformer, DTConfig, save_dt
from interplab.runs import Kind, list_checkpoints
from interplab.train.checkpoint import (
    checkpoint_dir,
    clean_stale_temps,
    global_rng_state,
    latest_good_checkpoint,
    load_checkpoint,
    optimizer_state,
    write_checkpoint,
)
from interplab.train.config import CheckpointConfig
from interplab.train.distributed import (
    DistInfo,
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    broadcast_,
    init_distributed,
    local_device,
    shutdown,
)
from interplab.train.log import truncate_log
from interplab.train.sources import cosine_lr, rows_for

if TYPE_CHECKING:
    from interplab.rl.trajectories import Trajectories

__all__ = [
    "DT_PRESETS",
    "DTTrainConfig",
    "DTTrainResult",
    "DTWindows",
    "WindowSampler",
    "action_loss",
    "batch_ends",
    "check_data",
    "data_summary",
    "decision_weights",
    "dt_preset",
    "evaluate_windows",
    "split_steps",
    "train_dt",
    "trajectory_windows",
]

TRAIN_CONFIG_VERSION = 1
ProgressFn = Callable[[dict[str, Any]], None]


# ---- windows -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DTWindows:
    """A batch of trajectory windows, left-padded to ``context`` steps (what `DecisionTransformer` takes)."""

    rtg: Float[Tensor, "batch T"]
    obs: Int[Tensor, "batch T h w c"]
    """uint8 observations"""
    actions: Int[Tensor, "batch T"]
    """the action taken at each step (the training target; ``pad_action`` at padding)"""
    timesteps: Int[Tensor, "batch T"]
    mask: Bool[Tensor, "batch T"]
    """True at real steps, False at the left padding"""
    ends: Int[Tensor, " batch"]
    """the (flat) step index of the data set each window ends at"""

    def __len__(self) -> int:
        return int(self.ends.shape[0])

    def inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(rtg, obs, actions, timesteps, mask)``: ``model(*windows.inputs())``."""
        return self.rtg, self.obs, self.actions, self.timesteps, self.mask

    def _fields(self) -> tuple[Tensor, ...]:
        # not dataclasses.astuple: that deep-copies every tensor
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to(self, device: torch.device | str) -> DTWindows:
        return DTWindows(*(t.to(device) for t in self._fields()))

    def __getitem__(self, rows: slice | Tensor) -> DTWindows:
        return DTWindows(*(t[rows] for t in self._fields()))


class WindowSampler:
    """A data set's steps as tensors, cut into windows (build once, sample many batches)."""

    def __init__(self, trajectories: Trajectories, context: int, *, pad_action: int = 7) -> None:
        if context <= 0:
            raise ValueError(f"context must be positive, got {context}")
        self.context = context
        self.pad_action = pad_action
        self.obs = torch.as_tensor(trajectories.obs)
        self.actions = torch.as_tensor(trajectories.actions).long()
        self.rtg = torch.as_tensor(trajectories.rtg).float()
        self.timesteps = torch.as_tensor(trajectories.timesteps).long()
        starts = torch.as_tensor(trajectories.episode_starts).long()
        n = self.actions.shape[0]
        if self.obs.shape[0] != n or self.rtg.shape[0] != n or int(starts[-1]) != n:
            raise ValueError(
                f"trajectories are inconsistent: {self.obs.shape[0]} observations, {n} actions, "
                f"{self.rtg.shape[0]} returns to go, episode_starts ending at {int(starts[-1])}"
            )
        lengths = starts[1:] - starts[:-1]
        self.episode_of_step = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        self.episode_start_of_step = starts[:-1][self.episode_of_step]
        self.episode_starts = starts

    @property
    def n_steps(self) -> int:
        return int(self.actions.shape[0])

    def windows(self, ends: Tensor) -> DTWindows:
        """The windows ending at the (flat) steps ``ends``."""
        ends = torch.as_tensor(ends).long()
        if ends.numel() and (int(ends.min()) < 0 or int(ends.max()) >= self.n_steps):
            raise ValueError(f"window ends must lie in 0..{self.n_steps - 1}, got {ends.min()}..{ends.max()}")
        idx = ends[:, None] - (self.context - 1) + torch.arange(self.context)  # batch, T
        mask = idx >= self.episode_start_of_step[ends][:, None]
        idx = torch.where(mask, idx, ends[:, None])  # padding reads a real step, then is blanked
        return DTWindows(
            rtg=torch.where(mask, self.rtg[idx], 0.0),
            obs=self.obs[idx] * mask[..., None, None, None].to(self.obs.dtype),
            actions=torch.where(mask, self.actions[idx], self.pad_action),
            timesteps=torch.where(mask, self.timesteps[idx], 0),
            mask=mask,
            ends=ends,
        )

    def episode_steps(self, episodes: Tensor) -> Tensor:
        """The flat step indices of ``episodes`` (in order)."""
        keep = torch.zeros(len(self.episode_starts) - 1, dtype=torch.bool)
        keep[torch.as_tensor(episodes).long()] = True
        return torch.nonzero(keep[self.episode_of_step]).flatten()


def trajectory_windows(
    trajectories: Trajectories,
    context: int,
    *,
    n: int | None = None,
    ends: Tensor | None = None,
    seed: int = 0,
    pad_action: int = 7,
) -> DTWindows:
    """Windows of ``context`` steps: ending at ``ends`` (flat step indices), else at ``n`` steps drawn uniformly
    (with ``seed``), else at every step of the data set. Each is left-padded (``mask`` False) where its episode
    began less than ``context`` steps earlier."""
    sampler = WindowSampler(trajectories, context, pad_action=pad_action)
    if ends is None:
        if n is None:
            ends = torch.arange(sampler.n_steps)
        else:
            ends = torch.randint(sampler.n_steps, (n,), generator=torch.Generator().manual_seed(seed))
    return sampler.windows(ends)


# ---- the config ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DTTrainConfig:
    """How a decision transformer is trained (the model is a `DTConfig`)."""

    steps: int = 2000
    """optimizer steps"""
    batch_size: int = 64
    """windows per step (the global batch, split over processes)"""
    lr: float = 6e-4
    """peak learning rate"""
    warmup: int = 100
    """linear warmup steps"""
    min_lr_ratio: float = 0.1
    """the cosine decays to lr * min_lr_ratio at the last step"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases, norms or embedding tables)"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    grad_clip: float | None = 1.0
    """clip the gradient norm (None: never)"""
    seed: int = 0
    """initialises the model and draws the batches and the validation split"""
    val_fraction: float = 0.1
    """episodes held out for validation (0: none)"""
    eval_every: int = 100
    """validation every this many steps (and at the last)"""
    eval_windows: int = 512
    """validation windows (fixed, drawn once)"""
    log_every: int = 10
    """log the training loss every this many steps"""
    decision_weight: float = 1.0
    """loss weight of the decision steps (`decision_weights`: on MiniGrid-Memory the turn at the split, about
    1 step in 7, the only one that needs the instruction and the return to go); the logged training loss is
    then the weighted mean, the validation loss and accuracy stay unweighted"""
    checkpoints: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(log_spaced=20))
    """when to save checkpoints: log-spaced (dense early) plus every ``every`` steps"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.checkpoints, dict):
            object.__setattr__(self, "checkpoints", CheckpointConfig(**self.checkpoints))
        for name in ("steps", "batch_size", "eval_every", "eval_windows", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if not self.decision_weight > 0:
            raise ValueError(f"decision_weight must be positive, got {self.decision_weight}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def replace(self, **changes: Any) -> DTTrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": TRAIN_CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DTTrainConfig:
        data = dict(data)
        version = data.pop("version", TRAIN_CONFIG_VERSION)
        if not isinstance(version, int) or version > TRAIN_CONFIG_VERSION:
            raise ValueError(f"DT train config version {version!r} is newer than this interplab")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DTTrainConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


DT_PRESETS: dict[str, tuple[DTConfig, DTTrainConfig]] = {
    "memory-dt-tiny": (
        DTConfig(
            env="MiniGrid-MemoryS7-v0",
            context=12,
            max_timestep=5 * 7**2,  # MemoryS7's max_steps
            d_model=64,
            n_layers=2,
            n_heads=4,
            d_mlp=128,
        ),
        # the memory decision (1 step in 7) is learnt only with its loss weighted up and after a plateau:
        # unweighted or at 1,500-5,000 steps the split is a coin flip on some seeds (see dttrain's report)
        DTTrainConfig(steps=8000, batch_size=32, lr=1e-3, warmup=50, eval_every=500, decision_weight=10.0),
    ),
}
"""Named (model, training) configs; ``memory-dt-tiny`` trains on MemoryS7 expert data in CPU minutes."""


def dt_preset(name: str) -> tuple[DTConfig, DTTrainConfig]:
    """The (model, training) configs of a preset (`DT_PRESETS`)."""
    if name not in DT_PRESETS:
        raise ValueError(f"unknown DT preset {name!r}; presets: {', '.join(sorted(DT_PRESETS))}")
    return DT_PRESETS[name]


# ---- the result ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DTTrainResult:
    """What a finished (or stopped) DT training run produced."""

    run_dir: Path
    step: int
    """the last step trained"""
    loss: float
    """training loss (mean action cross-entropy at real steps) at the last logged step"""
    val_loss: float | None
    val_accuracy: float | None
    """greedy action accuracy on the held-out episodes' windows, at real steps"""
    tokens: int
    """sequence tokens trained on (3 per window step, padding included)"""
    seconds: float
    """wall time of the training loop (this invocation)"""
    tokens_per_s: float
    checkpoints: tuple[int, ...]
    resumed_from: int | None = None
    skipped_checkpoints: tuple[str, ...] = ()

    def log(self) -> list[dict[str, Any]]:
        return runs.read_log(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in self.__dict__.items()
        }

    def plot(self) -> Any:
        """Training and validation loss against step (Plotly)."""
        import plotly.graph_objects as go

        rows = self.log()
        fig = go.Figure()
        for key, label in (("loss", "train loss"), ("val_loss", "validation loss")):
            pts = [r for r in rows if key in r]
            fig.add_scatter(x=[r["step"] for r in pts], y=[r[key] for r in pts], name=label)
        fig.update_layout(xaxis_title="step", yaxis_title="action cross-entropy", title=str(self.run_dir))
        return fig


# ---- training ------------------------------------------------------------------------------------
def data_summary(trajectories: Trajectories) -> dict[str, Any]:
    """What a run records about its data (the return range is what evaluation warns against)."""
    returns = np.asarray(trajectories.returns, dtype=np.float64)
    return {
        "env": trajectories.env,
        "source": trajectories.source,
        "n_episodes": int(trajectories.n_episodes),
        "n_steps": int(len(trajectories.actions)),
        "return_min": float(returns.min()) if returns.size else None,
        "return_max": float(returns.max()) if returns.size else None,
        "return_mean": float(returns.mean()) if returns.size else None,
    }


def split_steps(sampler: WindowSampler, cfg: DTTrainConfig) -> tuple[Tensor, Tensor]:
    """Train and validation end steps: whole episodes held out, chosen by the seed."""
    n_episodes = len(sampler.episode_starts) - 1
    n_val = int(round(cfg.val_fraction * n_episodes))
    if cfg.val_fraction > 0 and n_episodes >= 2:
        n_val = min(max(n_val, 1), n_episodes - 1)
    else:
        n_val = 0
    order = torch.randperm(n_episodes, generator=torch.Generator().manual_seed(cfg.seed))
    val_steps = sampler.episode_steps(order[:n_val]) if n_val else torch.zeros(0, dtype=torch.long)
    train_steps = sampler.episode_steps(order[n_val:])
    if n_val and len(val_steps) > cfg.eval_windows:
        pick = torch.randperm(len(val_steps), generator=torch.Generator().manual_seed(cfg.seed + 1))
        val_steps = val_steps[pick[: cfg.eval_windows]].sort().values
    return train_steps, val_steps


def batch_ends(train_steps: Tensor, cfg: DTTrainConfig, step: int) -> Tensor:
    """The global batch of ``step`` (1-based): window ends drawn uniformly over the training steps from a
    generator seeded by (seed, step) alone, so a resumed run draws what an uninterrupted one did."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return train_steps[torch.randint(len(train_steps), (cfg.batch_size,), generator=g)]


def action_loss(
    model: torch.nn.Module, w: DTWindows, step_weight: Tensor | None = None, *, checked: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed action cross-entropy at real steps, the number of real steps, and how many were predicted
    right (greedy). ``step_weight`` (float [steps of the data set], optional) weights each step's
    cross-entropy, and the count is then the sum of the weights (so ``ce / count`` is the weighted mean).
    ``checked``: the windows come from a data set `check_data` accepted and are on the model's device (a
    `DecisionTransformer` then skips its per-call input checks: `DecisionTransformer.forward_checked`)."""
    if checked and isinstance(model, DecisionTransformer):
        logits = model.forward_checked(
            w.rtg, w.obs, w.actions, w.timesteps, None if bool(w.mask.all()) else w.mask
        )
    else:
        logits = model(*w.inputs())
    real = w.mask
    targets = w.actions[real]
    picked = logits[real]
    correct = (picked.argmax(-1) == targets).sum()
    if step_weight is None:
        return F.cross_entropy(picked, targets, reduction="sum"), real.sum(), correct
    context = real.shape[1]
    flat = (w.ends[:, None] - (context - 1) + torch.arange(context, device=w.ends.device)).clamp(min=0)
    weight = step_weight.to(picked.device)[flat][real]
    ce = (F.cross_entropy(picked, targets, reduction="none") * weight).sum()
    return ce, weight.sum(), correct


def check_data(model: DecisionTransformer, sampler: WindowSampler, chunk: int = 65536) -> None:
    """Every step of the data set through the model's input checks (as one-step windows): observation values,
    actions and timesteps in range, or the model's error naming the bad value."""
    for i in range(0, sampler.n_steps, chunk):
        rows = slice(i, i + chunk)
        model.check_inputs(
            sampler.rtg[rows, None],
            sampler.obs[rows, None],
            sampler.actions[rows, None],
            sampler.timesteps[rows, None],
        )


def decision_weights(trajectories: Trajectories, weight: float) -> Tensor | None:
    """Per-step loss weights: ``weight`` at the steps whose action the current view does not determine
    (on MiniGrid-Memory the turn at the split, `interplab.rl.labels.decision_steps`), 1 elsewhere; None
    when ``weight`` is 1 or the environment has no such steps, and (with a warning) when the episodes do not
    replay from their seeds or minigrid is missing."""
    if weight == 1.0 or not trajectories.env.startswith("MiniGrid-Memory"):
        return None
    try:
        steps = decision_steps(trajectories)
    except (
        ValueError,
        ImportError,
    ) as e:  # not replayable from its seeds (e.g. synthetic data) or no minigrid
        warnings.warn(f"decision_weight={weight} is not applied (uniform loss weights): {e}", stacklevel=2)
        return None
    out = torch.ones(len(trajectories.actions))
    out[steps[steps >= 0]] = weight
    return out


@torch.no_grad()
def evaluate_windows(model: DecisionTransformer, windows: DTWindows, batch: int = 256) -> dict[str, float]:
    """Mean action cross-entropy and greedy accuracy over ``windows`` (real steps)."""
    was = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    try:
        for i in range(0, len(windows), batch):
            ce, n, correct = action_loss(model, windows[i : i + batch])
            total += torch.stack([ce.double().cpu(), n.double().cpu(), correct.double().cpu()])
    finally:
        model.train(was)
    steps = max(float(total[1]), 1.0)
    return {"val_loss": float(total[0]) / steps, "val_accuracy": float(total[2]) / steps}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        table = name.endswith(("W_E", "W_pos")) or name.startswith("state_embed.weight")
        (decay if p.dim() >= 2 and not table else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _run_config(model_cfg: DTConfig, cfg: DTTrainConfig, data: dict[str, Any]) -> dict[str, Any]:
    return {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "data": data}


def _check_run_dir(run_dir: Path, config: dict[str, Any], resume: bool) -> bool:
    """True if ``run_dir`` holds an earlier run of this config to continue."""
    if runs.detect(run_dir) is not Kind.DT_TRAIN:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(
                f"{run_dir} is not empty and is not a DT training run (it is {runs.describe(run_dir)}); "
                "choose another output folder"
            )
        return False
    if not resume:
        raise ValueError(
            f"{run_dir} already holds a DT training run; resume it or choose another output folder"
        )
    old = runs.DTTrainRun.open(run_dir).config
    try:  # fields added since the run was written read as their defaults
        old_full = DTTrainConfig.from_dict(old.get("train", {})).to_dict()
    except (TypeError, ValueError):
        old_full = old.get("train", {})
    old_train = {k: v for k, v in old_full.items() if k != "steps"}
    new_train = {k: v for k, v in config["train"].items() if k != "steps"}
    diff = [k for k in ("model", "data") if old.get(k) != config[k]]
    diff += sorted(
        f"train.{k}" for k in set(old_train) | set(new_train) if old_train.get(k) != new_train.get(k)
    )
    if diff:
        raise ValueError(
            f"{run_dir} was started with a different config (differs in {', '.join(diff)}); "
            "resume with the same config and data or choose another output folder"
        )
    return True


def _save_checkpoint(
    run_dir: Path, step: int, model: DecisionTransformer, optimizer: torch.optim.Optimizer, tokens: int
) -> Path:
    def write(tmp: Path) -> dict[str, Any]:
        save_dt(model, tmp)
        tensors, groups = optimizer_state(optimizer)
        save_tensors(tmp / runs.OPTIMIZER, tensors)
        save_tensors(tmp / runs.RNG, global_rng_state())
        return {"tokens": tokens, "param_groups": groups}

    return write_checkpoint(checkpoint_dir(run_dir, step), step, write)


def _fused(device: torch.device) -> bool | None:
    """AdamW's fused kernel where torch has one (CPU, CUDA): one kernel for all parameters instead of a
    Python loop of ~10 ops per tensor (on the tiny preset's CPU step ~2 ms of ~24). A run resumed from a
    checkpoint keeps the kernel it was started with (the param groups' ``fused`` are restored)."""
    return True if device.type in ("cpu", "cuda") else None


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train_dt(
    model_cfg: DTConfig,
    train_cfg: DTTrainConfig,
    trajectories: Trajectories,
    out: str | Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
) -> DTTrainResult:
    """Train a decision transformer on ``trajectories`` into the run folder ``out`` (see the module docstring),
    continuing from its newest intact checkpoint if ``out`` holds this run. ``stop_after=k`` stops after step
    k (with a checkpoint), to resume later. ``progress(event)`` receives dicts with ``event`` in {"setup",
    "step", "checkpoint", "done"} (rank 0 only)."""
    run_dir = Path(out)
    device = torch.device(device) if device is not None else _default_device()
    device = local_device(device)  # cuda:LOCAL_RANK under torchrun (one GPU per process)
    dist_info = init_distributed(device)
    notify = progress if (progress is not None and dist_info.main) else (lambda event: None)
    try:
        return _train(
            model_cfg, train_cfg, trajectories, run_dir, resume, stop_after, device, dist_info, notify
        )
    finally:
        shutdown(dist_info)


def _train(
    model_cfg: DTConfig,
    cfg: DTTrainConfig,
    trajectories: Trajectories,
    run_dir: Path,
    resume: bool,
    stop_after: int | None,
    device: torch.device,
    dist_info: DistInfo,
    notify: ProgressFn,
) -> DTTrainResult:
    if trajectories.env != model_cfg.env:
        raise ValueError(
            f"the trajectories are of {trajectories.env!r} but the model is for {model_cfg.env!r}"
        )
    if cfg.batch_size % dist_info.world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {dist_info.world} processes")
    data = data_summary(trajectories)
    config = _run_config(model_cfg, cfg, data)
    continuing = _check_run_dir(run_dir, config, resume)
    cleaned = clean_stale_temps(run_dir) if continuing and dist_info.main else []
    barrier()
    sampler = WindowSampler(trajectories, model_cfg.context, pad_action=model_cfg.pad_action)
    longest = int(sampler.timesteps.max()) if sampler.n_steps else 0
    if longest > model_cfg.max_timestep:
        raise ValueError(
            f"the trajectories reach timestep {longest}, beyond the model's max_timestep={model_cfg.max_timestep}"
        )
    train_steps, val_steps = split_steps(sampler, cfg)
    if len(train_steps) == 0:
        raise ValueError("no training steps: the data set has no episodes left after the validation split")
    val_windows = sampler.windows(val_steps).to(device) if len(val_steps) else None
    step_weight = decision_weights(trajectories, cfg.decision_weight)

    torch.manual_seed(cfg.seed)
    model = DecisionTransformer(model_cfg).to(device)
    check_data(model, sampler)  # once: the loop's batches then skip the model's per-call checks
    broadcast_(model.parameters())
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=_fused(device)
    )
    start, resumed_from, skipped, tokens_seen = 0, None, [], 0
    if continuing:
        ckpt, bad = latest_good_checkpoint(run_dir)
        skipped = [f"{c.path.name}: {reason}" for c, reason in bad]
        if ckpt is not None:
            state = load_checkpoint(ckpt.path, model, optimizer)
            start, resumed_from, tokens_seen = ckpt.step, ckpt.step, int(state.get("tokens", 0))
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(run_dir / runs.CONFIG, Kind.DT_TRAIN, config)
        if resumed_from is not None:
            truncate_log(run_dir, resumed_from)  # the steps after the checkpoint are trained again
    log = _Log(run_dir, dist_info.main)
    for item in cleaned:
        log.write({"event": "cleaned", "what": item})
    for item in skipped:
        log.write({"event": "skipped_checkpoint", "reason": item})
    schedule = set(cfg.checkpoints.steps(cfg.steps))
    if resumed_from is not None:
        log.write({"event": "resume", "step": resumed_from})
    elif dist_info.main and 0 in schedule and not list_checkpoints(run_dir):
        _save_checkpoint(run_dir, 0, model, optimizer, 0)
        log.write({"step": 0, **(evaluate_windows(model, val_windows) if val_windows is not None else {})})
    notify({"event": "setup", "episodes": data["n_episodes"], "steps": data["n_steps"]})

    stop = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    tokens_per_step = cfg.batch_size * 3 * model_cfg.context
    rows = rows_for(cfg.batch_size, 0, 1, dist_info.rank, dist_info.world)
    loss_value, val = float("nan"), dict[str, float]()
    for row in runs.read_log(run_dir) if resumed_from is not None else []:
        loss_value = row.get("loss", loss_value)
        val = {k: row[k] for k in ("val_loss", "val_accuracy") if k in row} or val
    t0, cpu0, aside, step = time.perf_counter(), time.process_time(), 0.0, start
    eval_seconds = ckpt_seconds = 0.0
    for step in range(start + 1, stop + 1):
        lr = cosine_lr(step - 1, lr=cfg.lr, warmup=cfg.warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        windows = sampler.windows(batch_ends(train_steps, cfg, step)[rows]).to(device)
        ce, count, _ = action_loss(model, windows, step_weight, checked=True)
        total_count = all_reduce_sum(count.detach().clone().float())
        loss = ce * (
            dist_info.world / total_count.clamp(min=1.0)
        )  # grads averaged over ranks: the global mean
        loss.backward()
        all_reduce_grads(model.parameters())
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        if step % cfg.log_every == 0 or step == stop or step in schedule:
            loss_value = float(all_reduce_sum(ce.detach().clone()) / total_count.clamp(min=1.0))
            elapsed = time.perf_counter() - t0
            row = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "tokens": tokens_seen,
                "tokens_per_s": tokens_per_step * (step - start) / max(elapsed, 1e-9),
                "elapsed_s": elapsed,
            }
            if val_windows is not None and (step % cfg.eval_every == 0 or step == stop) and dist_info.main:
                e0, ec0 = time.perf_counter(), time.process_time()
                val = evaluate_windows(model, val_windows)
                aside += time.process_time() - ec0
                eval_seconds += time.perf_counter() - e0
                row.update(val)
            log.write(row)
            notify({"event": "step", **row, "total": cfg.steps})
        if step in schedule or step == stop:
            c0, cc0 = time.perf_counter(), time.process_time()
            if dist_info.main:
                _save_checkpoint(run_dir, step, model, optimizer, tokens_seen)
                notify({"event": "checkpoint", "step": step})
            barrier()
            aside += time.process_time() - cc0
            ckpt_seconds += time.perf_counter() - c0
    seconds = time.perf_counter() - t0
    model.eval()
    if dist_info.main and step == cfg.steps:
        save_dt(model, run_dir / runs.FINAL)
    result = DTTrainResult(
        run_dir=run_dir,
        step=step,
        loss=loss_value,
        val_loss=val.get("val_loss"),
        val_accuracy=val.get("val_accuracy"),
        tokens=tokens_seen,
        seconds=seconds,
        tokens_per_s=tokens_per_step * (step - start) / max(seconds, 1e-9),
        checkpoints=tuple(c.step for c in list_checkpoints(run_dir)),
        resumed_from=resumed_from,
        skipped_checkpoints=tuple(skipped),
    )
    if dist_info.main:
        report = {
            **result.to_dict(),
            "train_cpu_seconds": time.process_time() - cpu0 - aside,
            "checkpoint_seconds": ckpt_seconds,
            "eval_seconds": eval_seconds,
            "finished": step == cfg.steps,
            "random_accuracy": 1.0 / model_cfg.n_actions,
            "data": data,
        }
        runs.write_json(run_dir / runs.REPORT, Kind.DT_TRAIN_REPORT, report)
    log.close()
    barrier()
    notify({"event": "done", "step": step, "total": cfg.steps})
    return result


class _Log:
    """``log.jsonl``: one JSON object per line, appended and flushed (rank 0 only)."""

    def __init__(self, run_dir: Path, main: bool) -> None:
        self.fh = open(run_dir / runs.LOG, "a") if main else None  # noqa: SIM115

    def write(self, row: dict[str, Any]) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps({**row, "time": time.time()}) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
