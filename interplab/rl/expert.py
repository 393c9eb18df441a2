"""A scripted expert for the supported MiniGrid tasks, with epsilon-noise and mixed skill, and the collector
that writes its episodes as a trajectory data set.

The expert reads the true state from ``env.unwrapped`` (agent position and direction, the grid) and plans
shortest paths by breadth-first search over (x, y, direction) with MiniGrid's left/right/forward moves:

- **Memory** (``MiniGrid-MemoryS7-v0``): first look at the instruction object in the start room (turn until it
  is in view: the agent often starts facing away from it, and a policy learned from the data can only know
  what it has seen), then walk the corridor and step onto the cell beside the matching object at the split
  (minigrid's ``success_pos``; the other object's ``failure_pos`` ends the episode with reward 0).
- **DoorKey**: go to the key and pick it up, go to the door and open it, go to the goal.
- **Empty**: go to the goal.

Noise: with probability ``epsilon`` a step's action is uniform over all 7 actions instead. Skill mix: each
episode draws its epsilon from ``skill_mix``, and on Memory goes to the wrong object with probability
``wrong_object``, so returns vary (return-to-go conditioning needs both successes and failures). Everything
random in episode ``e`` depends only on ``(seed, e)`` (the env is reset with seed ``seed + e``), so a resumed
collection writes exactly what an uninterrupted one would.

>>> data = collect("MiniGrid-MemoryS7-v0", 20, "memory", skill_mix=(0.0, 0.3), wrong_object=0.25)
>>> data.summary().success_rate > 0.4
True
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interplab.rl.envs import N_ACTIONS, env_spec, make_env
from interplab.rl.trajectories import SHARD_STEPS, Trajectories, TrajectoryWriter, load_trajectories

LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(7)
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # MiniGrid's DIR_TO_VEC: 0 east, 1 south, 2 west, 3 north
_KEY, _BALL = 5, 6  # minigrid.core.constants.OBJECT_TO_IDX
Progress = Callable[[int, int | None], None]
"""``progress(episodes_done, episodes_total)``."""


def _task(env: Any) -> str:
    name = type(env.unwrapped).__name__
    tasks = {"MemoryEnv": "memory", "DoorKeyEnv": "doorkey", "EmptyEnv": "empty"}
    if name not in tasks:
        raise ValueError(f"the scripted expert plays MemoryEnv, DoorKeyEnv and EmptyEnv, not {name}")
    return tasks[name]


def _passable(grid: Any, x: int, y: int) -> bool:
    if not (0 <= x < grid.width and 0 <= y < grid.height):
        return False
    cell = grid.get(x, y)
    return cell is None or cell.can_overlap()


def _plan(env: Any, done: Callable[[int, int, int], bool]) -> int | None:
    """The first action of a shortest left/right/forward path from the agent's state to a state where
    ``done(x, y, dir)``; None when there is none (or the agent is there already)."""
    u = env.unwrapped
    start = (int(u.agent_pos[0]), int(u.agent_pos[1]), int(u.agent_dir))
    if done(*start):
        return None
    first: dict[tuple[int, int, int], int] = {start: -1}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        x, y, d = state
        dx, dy = _DIRS[d]
        moves = [(LEFT, (x, y, (d - 1) % 4)), (RIGHT, (x, y, (d + 1) % 4))]
        if _passable(u.grid, x + dx, y + dy):
            moves.append((FORWARD, (x + dx, y + dy, d)))
        for action, nxt in moves:
            if nxt in first:
                continue
            first[nxt] = action if first[state] == -1 else first[state]
            if done(*nxt):
                return first[nxt]
            queue.append(nxt)
    return None


def _reach(env: Any, target: tuple[int, int]) -> int | None:
    return _plan(env, lambda x, y, d: (x, y) == target)


def _face(env: Any, target: tuple[int, int]) -> int | None:
    return _plan(env, lambda x, y, d: (x + _DIRS[d][0], y + _DIRS[d][1]) == target)


def _find(env: Any, kind: str) -> tuple[int, int] | None:
    grid = env.unwrapped.grid
    for i, cell in enumerate(grid.grid):
        if cell is not None and cell.type == kind:
            return (i % grid.width, i // grid.width)
    return None


def instruction_position(env: Any) -> tuple[int, int]:
    """Where MemoryEnv puts the instruction object: the start room's top-left cell (minigrid's memory.py)."""
    return (1, env.unwrapped.height // 2 - 1)


def instruction_in_view(env: Any, obs: Any) -> bool:
    """Whether observation ``obs`` (the [7, 7, 3] view the env just returned) shows the instruction object."""
    u = env.unwrapped
    view = u.relative_coords(*instruction_position(env))
    return view is not None and int(np.asarray(obs)[view[0], view[1], 0]) in (_KEY, _BALL)


def expert_action(env: Any, *, seen_instruction: bool = True, wrong: bool = False) -> int:
    """The scripted expert's action in the live state of ``env`` (a MiniGrid env, wrapped or not).

    Memory only: ``seen_instruction`` says whether the instruction object has been in view yet this episode
    (if not, the expert turns to look at it first; `collect` tracks it with `instruction_in_view`);
    ``wrong`` sends it to the non-matching object (a deliberate failure)."""
    u = env.unwrapped
    task = _task(env)
    if task == "memory":
        if not seen_instruction:
            x, y = int(u.agent_pos[0]), int(u.agent_pos[1])
            if x < 5 and abs(y - u.height // 2) <= 1:  # in the start room (or its doorway): turn to look
                return LEFT
            return _either(_reach(env, (3, u.height // 2)), LEFT)
        return _either(_reach(env, tuple(u.failure_pos if wrong else u.success_pos)), FORWARD)
    if wrong:
        raise ValueError("wrong=True is for the memory task (there is no wrong object in a navigation task)")
    if task == "doorkey":
        door = _find(env, "door")
        if door is not None and not u.grid.get(*door).is_open:
            key = _find(env, "key")
            if key is not None and (u.carrying is None or u.carrying.type != "key"):
                return _either(_face(env, key), PICKUP)
            return _either(_face(env, door), TOGGLE)
    goal = _find(env, "goal")
    return _either(_reach(env, goal) if goal is not None else None, FORWARD)


def _either(planned: int | None, otherwise: int) -> int:
    """The planned move, or ``otherwise`` when the agent is where the plan leads (facing the key: pick it up)."""
    return otherwise if planned is None else planned


def _source(epsilon: float, skill_mix: Sequence[float] | None, wrong_object: float) -> str:
    eps = f"eps in {list(skill_mix)}" if skill_mix else f"eps={epsilon:g}"
    return f"expert({eps}{f', wrong={wrong_object:g}' if wrong_object else ''})"


def play_episode(
    env_name: str, seed: int, rng: np.random.Generator, *, epsilon: float, wrong: bool, env: Any = None
) -> Trajectories:
    """One episode of the (noisy) expert from ``reset(seed=seed)``; ``rng`` drives the noise."""
    spec = env_spec(env_name)
    env = env if env is not None else make_env(env_name)
    obs, _ = env.reset(seed=seed)
    memory = _task(env) == "memory"
    seen = instruction_in_view(env, obs) if memory else True
    views, actions, rewards = [], [], []
    for _ in range(spec.max_steps):
        if rng.random() < epsilon:
            action = int(rng.integers(N_ACTIONS))
        else:
            action = expert_action(env, seen_instruction=seen, wrong=wrong) if memory else expert_action(env)
        views.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(float(reward))
        if memory and not seen:
            seen = instruction_in_view(env, obs)
        if terminated or truncated:
            break
    n = len(actions)
    dones = torch.zeros(n, dtype=torch.bool)
    dones[-1] = True
    return Trajectories(
        env=env_name,
        obs=torch.from_numpy(np.stack(views)),
        actions=torch.tensor(actions),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        dones=dones,
        episode_starts=torch.tensor([0, n]),
        seeds=torch.tensor([seed]),
    )


def collect(
    env_name: str,
    n_episodes: int,
    out: str | Path,
    *,
    epsilon: float = 0.0,
    skill_mix: Sequence[float] | None = None,
    wrong_object: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
    shard_steps: int = SHARD_STEPS,
) -> Trajectories:
    """Play ``n_episodes`` of the scripted expert on ``env_name`` and write them to the trajectory folder
    ``out`` (resumable: a folder holding part of the same collection is continued after its last complete
    shard; one holding at least ``n_episodes`` of it is returned as it is).

    ``epsilon``: the probability of a random action at each step; ``skill_mix``: instead, each episode's
    epsilon drawn uniformly from these values; ``wrong_object``: (Memory) the fraction of episodes that go to
    the non-matching object. Episode ``e`` is reset with seed ``seed + e``."""
    spec = env_spec(env_name)
    if n_episodes < 0:
        raise ValueError(f"n_episodes must be >= 0, got {n_episodes}")
    mix = [float(e) for e in skill_mix] if skill_mix is not None else None
    for eps in [epsilon, *(mix or [])]:
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {eps}")
    if mix is not None and (not mix or epsilon != 0.0):
        raise ValueError(
            f"give either epsilon or a non-empty skill_mix, not both (epsilon={epsilon}, skill_mix={mix})"
        )
    if not 0.0 <= wrong_object <= 1.0:
        raise ValueError(f"wrong_object must be in [0, 1], got {wrong_object}")
    if wrong_object and "Memory" not in spec.name:
        raise ValueError(f"wrong_object is for the memory task; {env_name} has no wrong object")
    settings = {
        "policy": "expert",
        "epsilon": epsilon,
        "skill_mix": mix,
        "wrong_object": wrong_object,
        "seed": seed,
    }
    writer = TrajectoryWriter(
        Path(out),
        env_name,
        source=_source(epsilon, mix, wrong_object),
        settings=settings,
        shard_steps=shard_steps,
    )
    if writer.episodes_written >= n_episodes and writer.episodes_written > 0:
        writer.close()
        return load_trajectories(out)
    env = make_env(env_name)
    with writer:
        for e in range(writer.episodes_written, n_episodes):
            rng = np.random.default_rng([seed, e])
            eps = mix[int(rng.integers(len(mix)))] if mix else epsilon
            wrong = bool(rng.random() < wrong_object)
            writer.add(play_episode(env_name, seed + e, rng, epsilon=eps, wrong=wrong, env=env))
            if progress is not None:
                progress(e + 1, n_episodes)
    return load_trajectories(out)
