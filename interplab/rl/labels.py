"""Environment variables per step for probes and patching, recovered by replaying each episode from its seed
(MiniGrid is deterministic given the seed and the actions) and checked against the recorded observations:
the agent's direction and position, the objects in view and, on MiniGrid-Memory, the instruction object, the
side of the matching object, the decision step at the split, and instruction-swapped twins of the episodes.

>>> labels = instruction_labels(trajs)                         # 0 key, 1 ball, per step
>>> pair = instruction_pair(trajs, decision_steps(trajs), context=4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interplab.rl.trajectories import Trajectories
from interplab.rl.windows import BALL, KEY, Windows, to_tensor, windows

INSTRUCTION_NAMES = ("key", "ball")
"""label 0 and 1 of `instruction_labels`"""
_MEMORY_PREFIX = "MiniGrid-Memory"


@dataclass(frozen=True)
class EnvLabels:
    """Per-step environment variables (flat step axis), recovered by replaying each episode from its seed."""

    instruction: Int[Tensor, " steps"] | None
    """MemoryS*: the start-room object, 0 key 1 ball (None for other envs)"""
    target_side: Int[Tensor, " steps"] | None
    """MemoryS*: where the matching object is, 0 up (north) 1 down (south) (None for other envs)"""
    direction: Int[Tensor, " steps"]
    """the agent's direction when observing (0 east, 1 south, 2 west, 3 north)"""
    x: Int[Tensor, " steps"]
    y: Int[Tensor, " steps"]
    front_object: Int[Tensor, " steps"]
    """the object index of the cell in front of the agent (read from the view)"""
    key_in_view: Bool[Tensor, " steps"]
    ball_in_view: Bool[Tensor, " steps"]
    instruction_in_view: Bool[Tensor, " steps"] | None = None
    """MemoryS*: the instruction object itself is in the view (its start-room cell is seen, not occluded)"""

    def as_dict(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


def _episode_bounds(trajs: Trajectories) -> list[tuple[int, int]]:
    s = to_tensor(trajs.episode_starts, torch.long).tolist()
    return list(zip(s[:-1], s[1:], strict=True))


def _replay(trajs: Trajectories, swap_instruction: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Replay every episode from its seed with its recorded actions: the per-step agent state and the
    observations (of the instruction-swapped layout when ``swap_instruction``). Unswapped observations must
    equal the recorded ones (otherwise the file is of another env or seeding)."""
    try:
        import gymnasium
        import minigrid  # noqa: F401  (registers the MiniGrid ids)
        from minigrid.core.world_object import Ball, Key
    except ImportError as err:
        raise ImportError(
            f"replaying MiniGrid episodes needs the rl extra (minigrid + gymnasium): {err}"
        ) from None
    memory = trajs.env.startswith(_MEMORY_PREFIX)
    if swap_instruction and not memory:
        raise ValueError(
            f"instruction swaps need a MiniGrid Memory env, the trajectories are of {trajs.env!r}"
        )
    obs_rec = np.asarray(trajs.obs)
    actions = np.asarray(trajs.actions)
    seeds = np.asarray(trajs.seeds)
    n = obs_rec.shape[0]
    keys = ("direction", "x", "y", "instruction", "target_side", "split_x", "instruction_seen")
    state = {k: np.zeros(n, dtype=np.int64) for k in keys}
    obs_out = np.empty_like(obs_rec)
    env = gymnasium.make(trajs.env, disable_env_checker=True)
    try:
        for e, (a, b) in enumerate(_episode_bounds(trajs)):
            obs, _ = env.reset(seed=int(seeds[e]))
            u: Any = env.unwrapped
            inst = side = split = 0
            cell = (0, 0)
            if memory:
                cell = (1, u.height // 2 - 1)
                kind = u.grid.get(*cell).type
                inst = INSTRUCTION_NAMES.index(kind)
                if swap_instruction:
                    u.grid.set(*cell, (Key if kind == "ball" else Ball)("green"))
                    u.success_pos, u.failure_pos = u.failure_pos, u.success_pos
                    obs = u.gen_obs()
                side = int(u.success_pos[1] > u.height // 2)
                split = int(u.success_pos[0])
            for i in range(a, b):
                if not swap_instruction and not np.array_equal(obs["image"], obs_rec[i]):
                    raise ValueError(
                        f"episode {e} (seed {int(seeds[e])}) step {i - a}: replaying {trajs.env!r} from the seed "
                        "does not reproduce the recorded observation (trajectories of another env or seeding?)"
                    )
                obs_out[i] = obs["image"]
                state["direction"][i] = u.agent_dir
                state["x"][i], state["y"][i] = int(u.agent_pos[0]), int(u.agent_pos[1])
                state["instruction"][i], state["target_side"][i], state["split_x"][i] = inst, side, split
                if memory:  # the instruction's cell is in the view and shows an object (not occluded)
                    rel = u.relative_coords(*cell)
                    state["instruction_seen"][i] = rel is not None and obs["image"][rel[0], rel[1], 0] in (
                        KEY,
                        BALL,
                    )
                if i + 1 < b:
                    obs, *_ = env.step(int(actions[i]))
    finally:
        env.close()
    return state, obs_out


def env_labels(trajs: Trajectories) -> EnvLabels:
    """The agent's direction and position, the object ahead and in view and, on MemoryS*, the instruction
    object and the side of the matching one, for every step (replayed from the seeds and checked against the
    recorded observations)."""
    state, _ = _replay(trajs)
    obs = to_tensor(trajs.obs, torch.long)
    memory = trajs.env.startswith(_MEMORY_PREFIX)
    objects = obs[..., 0].flatten(1)
    return EnvLabels(
        instruction=torch.from_numpy(state["instruction"]) if memory else None,
        target_side=torch.from_numpy(state["target_side"]) if memory else None,
        direction=torch.from_numpy(state["direction"]),
        x=torch.from_numpy(state["x"]),
        y=torch.from_numpy(state["y"]),
        front_object=obs[:, 3, 5, 0],
        key_in_view=(objects == KEY).any(1),
        ball_in_view=(objects == BALL).any(1),
        instruction_in_view=torch.from_numpy(state["instruction_seen"]).bool() if memory else None,
    )


def instruction_labels(trajs: Trajectories) -> Int[Tensor, " steps"]:
    """MemoryS*: the instruction (start-room) object of each step's episode, 0 key 1 ball.

    MiniGrid places it at ``(1, height // 2 - 1)`` while the agent starts facing east at x >= 1, so the
    first observation usually does not show it (the agent has to turn round to see it): the label is read
    from the episode's layout, regenerated from its seed and checked against the recorded observations."""
    if not trajs.env.startswith(_MEMORY_PREFIX):
        raise ValueError(f"instruction labels exist for MiniGrid Memory envs, got {trajs.env!r}")
    labels = env_labels(trajs).instruction
    assert labels is not None  # a Memory env
    return labels


def swapped_instruction_obs(trajs: Trajectories) -> Int[Tensor, "steps 7 7 3"]:
    """The observations each MemoryS* episode would have shown with the other instruction object (same seed,
    same actions): they differ from the recorded ones only where the instruction object is in view."""
    return torch.from_numpy(_replay(trajs, swap_instruction=True)[1])


@dataclass(frozen=True)
class InstructionPair:
    """Windows that differ only in the instruction object, and the action each one's instruction asks for."""

    clean: Windows
    corrupt: Windows
    answer: Int[Tensor, " batch"]
    """the correct action under the clean instruction"""
    wrong: Int[Tensor, " batch"]
    """the correct action under the swapped one"""


def decision_steps(trajs: Trajectories) -> Int[Tensor, " episodes"]:
    """MemoryS*: the flat step of each episode at which the agent first stands at the split facing east
    (where it must turn towards the matching object); -1 where it never does."""
    if not trajs.env.startswith(_MEMORY_PREFIX):
        raise ValueError(f"decision steps exist for MiniGrid Memory envs, got {trajs.env!r}")
    state, _ = _replay(trajs)
    at_split = (state["x"] == state["split_x"]) & (state["direction"] == 0)
    out = []
    for a, b in _episode_bounds(trajs):
        hit = np.nonzero(at_split[a:b])[0]
        out.append(a + int(hit[0]) if len(hit) else -1)
    return torch.tensor(out, dtype=torch.long)


def instruction_pair(trajs: Trajectories, ends: Sequence[int] | Tensor, context: int) -> InstructionPair:
    """Windows ending at the flat steps ``ends`` (e.g. `decision_steps`) and their instruction-swapped twins;
    the answer is the turn towards the clean matching object (left = north when facing east)."""
    ends_t = to_tensor(ends, torch.long).reshape(-1)
    if bool((ends_t < 0).any()):
        raise ValueError("ends holds -1 (an episode that never reached the split): drop those episodes")
    clean = windows(trajs, context, ends=ends_t)
    swapped = dataclasses.replace(trajs, obs=swapped_instruction_obs(trajs))
    corrupt = windows(swapped, context, ends=ends_t)
    state, _ = _replay(trajs)
    side = torch.from_numpy(state["target_side"])[ends_t]
    return InstructionPair(clean=clean, corrupt=corrupt, answer=side.clone(), wrong=1 - side)
