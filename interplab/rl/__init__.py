"""Decision transformers on gridworlds (MiniGrid), analysed with the lab's tools.

The pipeline: `collect` trajectories (a scripted expert with noise and mixed skill, or PPO) -> `train_dt` a
`DecisionTransformer` (built on interplab's `Transformer`, so every TransformerLens hook name works) ->
`evaluate_dt` (the calibration curve: achieved vs target return) -> `interplab.rl.analysis` (probes, patching,
attention over state tokens, SAEs, steering). Environments need the ``rl`` extra (``pip install
'interplab[rl]'``: minigrid + gymnasium); everything else imports without it.

Public names are imported lazily (``interplab.rl.X`` loads only the module that defines X).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # environments and data
    "EnvSpec": "envs",
    "SUPPORTED_ENVS": "envs",
    "env_spec": "envs",
    "make_env": "envs",
    "make_vector_env": "envs",
    "render_obs": "envs",
    "Trajectories": "trajectories",
    "TrajectorySummary": "trajectories",
    "TrajectoryWriter": "trajectories",
    "load_trajectories": "trajectories",
    "collect": "expert",
    "expert_action": "expert",
    "PPOConfig": "ppo",
    "PPO_PRESETS": "ppo",
    "ppo_preset": "ppo",
    "PPOPolicy": "ppo",
    "train_ppo": "ppo",
    "load_ppo_policy": "ppo",
    "play_ppo": "ppo",
    "collect_ppo": "ppo",
    # the model and its training
    "DTConfig": "model",
    "DecisionTransformer": "model",
    "save_dt": "model",
    "load_dt": "model",
    "DTTrainConfig": "train",
    "DTTrainResult": "train",
    "train_dt": "train",
    "trajectory_windows": "train",
    # evaluation
    "Calibration": "evaluate",
    "evaluate_dt": "evaluate",
    "rollout": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'interplab.rl' has no attribute {name!r}")
    return getattr(importlib.import_module(f"interplab.rl.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
