"""The name of every file and folder a run holds (see `interplab.runs` for the layout of each kind), and
the checkpoint folder names."""

from __future__ import annotations

import re

from interplab.integrity import CHECKSUMS

CONFIG = "config.json"
LOG = "log.jsonl"
REPORT = "report.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
STATE = "state.json"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_SPARSITY = "sparsity.safetensors"
SAES = "saes"
SAE_DIR = "sae"
EVAL = "eval"
TRAIN_SUMMARY = "train_summary.json"
MANIFEST = "manifest.json"
FEATURE_DB = "features.db"
FORMATION = "formation"
FORMATION_JSON = "formation.json"
DIFFS = "diffs"
"""a training run's model diffs between its checkpoints (``RUN/diffs/step_A-step_B/``, `interplab sae diff`)"""
DIFF_JSON = "diff.json"
"""a model diff's result (Kind.MODEL_DIFF: counts, per latent its relative decoder norm, label and cosine)"""
DIFF_TABLE = "diff.md"
"""a model diff's table (new / lost / shared latents, the leaning-new ones with their contexts)"""
CROSSCODER_DIR = "crosscoder"
"""the crosscoder inside a model diff (a Kind.CROSSCODER folder: ``RUN/diffs/step_A-step_B/crosscoder/``)"""
CROSSCODER_CFG = "cfg.json"
"""a crosscoder folder's config (Kind.CROSSCODER; the same name as an SAE's cfg.json, told apart by its kind)"""
CROSSCODER_WEIGHTS = "crosscoder.safetensors"
"""a crosscoder folder's weights (W_enc, W_dec, b_enc, b_dec, threshold), beside its cfg.json"""
METRICS_JSON = "metrics.json"
ATTRIBUTION = "attribution"
LLC = "llc"
"""the LLC along a run's checkpoints (Kind.LLC: report.json + pictures), inside its training run"""
LLC_ESTIMATES = "estimates"
"""one ``step_N.json`` per estimated checkpoint (Kind.LLC_CHECKPOINT), inside an LLC folder"""
GRADIENT_INDEX = "index.json"
PLOTLY_JS = "plotly.min.js"
CALIBRATION_JSON = "calibration.json"
GRAPH_JSON = "graph.json"  # an attribution graph's Neuronpedia JSON (foreign: no kind)
GRAPH_TENSORS = "graph.safetensors"  # an attribution graph's adjacency and nodes
"""a decision-transformer evaluation's calibration (Kind.DT_EVAL), in its run folder"""
CALIBRATION_HTML = "calibration.html"
"""the calibration curve of an evaluation folder (beside its ``calibration.json``)"""
ROLLOUTS = "trajectories"
"""the episodes a decision-transformer evaluation played (a Kind.TRAJECTORIES folder inside its run)"""
DT_ATTENTION = "attention.safetensors"
"""a decision-transformer analysis's attention patterns over its trajectory windows (beside its report.json)"""
CLT_CFG = "cfg.json"
"""a CLT folder's config (Kind.CLT; the same name as an SAE's cfg.json, told apart by its kind)"""
CLT_DIR = "clt"
"""the finished CLT inside a CLT training run (a Kind.CLT folder)"""
CLTS_DIR = "clts"
"""one CLT training run per model checkpoint, inside a CLT run trained across a run's checkpoints"""
GRAPHS = "graphs"
"""a training run's attribution graphs (``RUN/graphs/NAME/``: one graph, or Kind.GRAPH_ACROSS with step_N/)"""
RUN_CLTS = "clt"
"""the CLTs of a training run's checkpoints (``RUN/clt/``, a Kind.CLT_TRAIN run across checkpoints:
``clts/step_N/clt/``), `interplab clt train --model RUN --checkpoints ...` without ``--out``"""
RUN_SHARED_CLT = "clt-shared"
"""one CLT shared by a training run's checkpoints (``RUN/clt-shared/``, a Kind.CLT_TRAIN run whose data is
pooled from them: ``clt/``), `interplab clt train --model RUN --checkpoints ... --shared` without ``--out``"""
_SHARD_PREFIX = "shard_"
_SHARD_DIGITS = 5
_CKPT_PREFIX = "step_"
_CKPT_DIGITS = 6
_SQLITE_MAGIC = b"SQLite format 3\x00"


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of ``step`` (``step_000123``; every run kind uses this)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{_CKPT_PREFIX}{step:0{_CKPT_DIGITS}d}"


def shard_name(index: int) -> str:
    """The file name of shard ``index`` of a sharded folder (``shard_00000.safetensors``: activation caches,
    trajectory data sets)."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{_SHARD_PREFIX}{index:0{_SHARD_DIGITS}d}.safetensors"


_CKPT_RE = re.compile(rf"^{_CKPT_PREFIX}(\d+)$")


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name (any number of digits: older SAE runs wrote 8), else None."""
    m = _CKPT_RE.match(name)
    return int(m.group(1)) if m else None


__all__ = ["CHECKSUMS"]
