"""Training configuration: frozen dataclasses that round-trip to JSON and YAML, and the named presets.

>>> cfg = load_preset("induction-2l")
>>> cfg.model.smear_keys, cfg.data.source
(True, 'python-stdlib')
>>> TrainConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from interplab import runs
from interplab.model.config import ModelConfig

TRAIN_CONFIG_VERSION = 1
PRESET_DIR = Path(__file__).parent / "presets"


class Precision(str, Enum):
    """Arithmetic of the forward and backward pass (master weights and optimizer state stay float32)."""

    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast
    AUTO = "auto"  # bf16 on GPUs and on CPUs with AMX bf16 units, else float32 (see docs/training.md)


class Logger(str, Enum):
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training sequences come from: a text corpus (language modelling) or an algorithmic task."""

    source: str = "python-stdlib"
    """``python-stdlib``, a file/folder path, a saved HF dataset folder, or ``task:NAME`` (interplab.tasks)"""
    vocab_size: int = 1024
    """BPE vocabulary size trained on the corpus (ignored for tasks)"""
    seq_len: int = 256
    """tokens per training sequence (at most the model's n_ctx)"""
    val_fraction: float = 0.05
    """fraction of the corpus' files held out for validation"""
    task_args: dict[str, Any] = field(default_factory=dict)
    """keyword arguments of ``interplab.tasks.get_task`` when source is ``task:NAME``"""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("data.source is empty: give 'python-stdlib', a path, or 'task:NAME'")
        if self.vocab_size < 260:
            raise ValueError(f"data.vocab_size={self.vocab_size} is too small for byte-level BPE (>= 260)")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be at least 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")

    @property
    def task(self) -> str | None:
        return self.source[5:] if self.source.startswith("task:") else None


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, gradient clipping."""

    lr: float = 3e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """the cosine decays to lr * min_lr_ratio at the last step"""
    warmup_steps: int = 50
    """linear warmup from 0 to lr"""
    weight_decay: float = 0.05
    """AdamW weight decay (matrices only; biases, norms and gates are not decayed)"""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas"""
    grad_clip: float | None = 1.0
    """clip the global gradient norm to this (None: no clipping)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr={self.lr} must be a finite positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip} must be positive or None")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas} must be two numbers in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When to save: log-spaced steps (dense early, for studying formation) plus every ``every`` steps."""

    log_spaced: int = 40
    """number of log-spaced checkpoint steps between step 1 and the last step"""
    every: int | None = None
    """also save every this many steps (None: only log-spaced, the first and the last)"""
    keep_optimizer: bool = True
    """save optimizer and RNG state (needed to resume; the last checkpoint always keeps it)"""

    def __post_init__(self) -> None:
        if self.log_spaced < 0:
            raise ValueError(f"checkpoints.log_spaced={self.log_spaced} must be >= 0")
        if self.every is not None and self.every <= 0:
            raise ValueError(f"checkpoints.every={self.every} must be positive or None")

    def steps(self, total: int) -> list[int]:
        """The checkpoint steps of a run of ``total`` steps: 0, log-spaced, every-k, and ``total``."""
        out = {0, total}
        if self.log_spaced and total > 1:
            for i in range(self.log_spaced):
                out.add(int(round(math.exp(math.log(total) * (i + 1) / self.log_spaced))))
        if self.every:
            out.update(range(self.every, total + 1, self.every))
        return sorted(s for s in out if 0 <= s <= total)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that fixes a training run (the run directory's ``config.json``)."""

    model: ModelConfig | None = None
    """the architecture (d_vocab is set from the tokenizer or task); None only for a task: its own model"""
    data: DataConfig = field(default_factory=DataConfig)
    """the data source"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimizer and schedule"""
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    """checkpoint schedule"""
    steps: int = 1000
    """optimizer steps"""
    batch_size: int = 8
    """sequences per optimizer step (the global batch, over all processes and accumulation steps)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    seed: int = 0
    """seed of the initialisation and of the data order"""
    precision: Precision = Precision.AUTO
    """float32 or bf16 autocast"""
    eval_every: int = 100
    """evaluate on held-out data every this many steps (and at the end)"""
    eval_batches: int = 4
    """held-out batches per evaluation"""
    log_every: int = 10
    """write a log line every this many steps"""
    loggers: tuple[Logger, ...] = ()
    """extra metric sinks (TensorBoard, wandb), off by default"""
    name: str = ""
    """the preset or run name (informational)"""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        for key, cls in (("data", DataConfig), ("optim", OptimConfig), ("checkpoints", CheckpointConfig)):
            value = getattr(self, key)
            if isinstance(value, dict):
                object.__setattr__(self, key, _build(cls, value, key))
        if self.model is None and self.data.task is None:
            raise ValueError(
                "a train config needs a 'model' section (only task sources have a default model)"
            )
        try:
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError:
            raise ValueError(f"precision={self.precision!r} is not one of: fp32, bf16, auto") from None
        try:
            object.__setattr__(self, "loggers", tuple(Logger(x) for x in self.loggers))
        except ValueError as err:
            raise ValueError(f"loggers: {err}; valid: tensorboard, wandb") from None
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}"
            )
        if self.model is not None and self.data.task is None and self.data.seq_len > self.model.n_ctx:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is longer than the model's n_ctx={self.model.n_ctx}"
            )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def override(self, assignments: list[str]) -> TrainConfig:
        """Apply ``key=value`` overrides with dotted keys (``optim.lr=1e-3``, ``model.n_layers=4``);
        values are parsed as YAML."""
        data = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
            key, raw = item.split("=", 1)
            node = data
            parts = key.strip().split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"unknown setting {key!r}: {part!r} is not a section ({sorted(data)})")
                node = node[part]
            if parts[-1] not in node:
                raise ValueError(f"unknown setting {key!r}; valid keys here: {sorted(node)}")
            node[parts[-1]] = yaml.safe_load(raw)
        return TrainConfig.from_dict(data)

    # ---- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": TRAIN_CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model":
                value = (
                    None if value is None else {k: v for k, v in value.to_dict().items() if k != "version"}
                )
            elif dataclasses.is_dataclass(value):
                value = {g.name: _plain(getattr(value, g.name)) for g in dataclasses.fields(value)}
            else:
                value = _plain(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        kind = data.pop("kind", runs.Kind.TRAIN.value)  # a run's config.json says what it is
        if kind != runs.Kind.TRAIN.value:
            raise ValueError(
                f"this is a {kind!r} document, not a training config ({runs.Kind.TRAIN.value!r})"
            )
        version = data.pop("version", TRAIN_CONFIG_VERSION)
        if version > TRAIN_CONFIG_VERSION:
            raise ValueError(
                f"train config version {version} is newer than this interplab ({TRAIN_CONFIG_VERSION})"
            )
        return _build(cls, data, "config")

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a ``.yaml``/``.yml`` or ``.json`` config."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = (
                yaml.safe_load(path.read_text())
                if path.suffix in (".yaml", ".yml")
                else json.loads(path.read_text())
            )
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{where}: not valid YAML: {what}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_json(self, path: str | Path) -> None:
        """Write the config as a ``train`` JSON document (a training run's ``config.json``)."""
        runs.write_json(Path(path), runs.Kind.TRAIN, self.to_dict())


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {where} settings {unknown}; valid: {sorted(fields)}")
    data = dict(data)
    for name, value in data.items():
        kind = str(fields[name].type)
        # YAML 1.1 reads 1e-3 as a string; accept it where a float is expected
        if isinstance(value, str) and kind.startswith("float"):
            try:
                value = data[name] = float(value)
            except ValueError:
                raise ValueError(f"{where}.{name}={value!r} is not a number") from None
        if value is None and kind.endswith("| None"):
            continue
        if kind.startswith("int") and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{where}.{name}={value!r} is not an integer")
        if kind.startswith("float"):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{where}.{name}={value!r} is not a number")
            if not math.isfinite(value):
                raise ValueError(f"{where}.{name}={value!r} must be a finite number")
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{where}.{name}={value!r} is not true or false")
    return cls(**data)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> TrainConfig:
    """A named preset (``interplab/train/presets/NAME.yaml``)."""
    file = PRESET_DIR / f"{name}.yaml"
    if not file.is_file():
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")
    return TrainConfig.from_file(file)
