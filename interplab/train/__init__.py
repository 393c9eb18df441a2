"""interplab.train: train small transformers on corpora or algorithmic tasks, with dense checkpoints."""

from interplab.train.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from interplab.train.config import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    Precision,
    TrainConfig,
    load_preset,
    preset_names,
)
from interplab.train.trainer import TrainResult, build_model, read_log, train

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "DataConfig",
    "OptimConfig",
    "Precision",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "list_checkpoints",
    "load_checkpoint",
    "load_preset",
    "preset_names",
    "read_log",
    "save_checkpoint",
    "train",
]
