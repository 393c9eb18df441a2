"""Trajectory collection speed (steps/s): the scripted expert writing a trajectory data set, against the bare
minigrid loop every collector pays for.

Contenders, interleaved in rounds (alternating order) on MiniGrid-MemoryS7-v0 and DoorKey-5x5, medians
reported, wall and CPU time:
- ``minigrid_loop``: ``gymnasium.make`` replaying the very episodes the expert plays (same seeds, same
  actions), keeping ``obs["image"]`` copies in a list: the floor of any collector of these episodes (the
  reference library, DecisionTransformerInterpretability, steps the same minigrid envs; it pins gym-0.26-era
  packages and does not install beside gymnasium 1.x, so this loop stands in for it);
- ``expert_episodes``: `play_episode` of the noisy expert (planning + noise + the arrays), nothing written;
- ``collect``: `collect` end to end (the expert with a skill mix, sharded safetensors + manifest on disk).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_dt_collect.py --out benchmarks/results/dt_collect.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from interplab.rl.envs import make_env
from interplab.rl.expert import collect, play_episode

SKILL_MIX = (0.0, 0.1, 0.25, 0.5)


def _wrong(name: str) -> float:
    return 0.3 if "Memory" in name else 0.0


def timed(fn) -> tuple[float, float, int]:
    wall, cpu = time.perf_counter(), time.process_time()
    steps = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, steps


def minigrid_loop(name: str, episodes: list[tuple[int, list[int]]]) -> int:
    import gymnasium
    import minigrid  # noqa: F401  (registers the envs)

    env = gymnasium.make(name)
    images, steps = [], 0
    for seed, actions in episodes:
        obs, _ = env.reset(seed=seed)
        for action in actions:
            images.append(obs["image"].copy())
            obs, *_ = env.step(action)
        steps += len(actions)
    return steps


def expert_episodes(name: str, n_episodes: int, seed: int) -> int:
    env = make_env(name)
    steps = 0
    for e in range(n_episodes):  # the episodes `collect` plays (its per-episode draws, in its order)
        rng = np.random.default_rng([seed, e])
        eps = SKILL_MIX[int(rng.integers(len(SKILL_MIX)))]
        wrong = bool(rng.random() < _wrong(name))
        steps += play_episode(name, seed + e, rng, epsilon=eps, wrong=wrong, env=env).n_steps
    return steps


def collect_run(name: str, n_episodes: int, seed: int) -> int:
    folder = Path(tempfile.mkdtemp(prefix="bench_dt_collect_"))
    try:
        data = collect(
            name, n_episodes, folder / "d", skill_mix=SKILL_MIX, wrong_object=_wrong(name), seed=seed
        )
        return data.n_steps
    finally:
        shutil.rmtree(folder)


def recorded(name: str, n_episodes: int, seed: int) -> list[tuple[int, list[int]]]:
    """The (seed, actions) of the episodes `collect_run` plays: what the bare loop replays."""
    folder = Path(tempfile.mkdtemp(prefix="bench_dt_collect_"))
    try:
        data = collect(
            name, n_episodes, folder / "d", skill_mix=SKILL_MIX, wrong_object=_wrong(name), seed=seed
        )
        starts = data.episode_starts.tolist()
        return [
            (int(data.seeds[e]), data.actions[starts[e] : starts[e + 1]].tolist())
            for e in range(data.n_episodes)
        ]
    finally:
        shutil.rmtree(folder)


def env_case(name: str, rounds: int, episodes: int) -> dict:
    replays = {r: recorded(name, episodes, 1000 * r) for r in (*range(rounds), 99)}
    contenders = {
        "minigrid_loop": lambda r: minigrid_loop(name, replays[r]),
        "expert_episodes": lambda r: expert_episodes(name, episodes, 1000 * r),
        "collect": lambda r: collect_run(name, episodes, 1000 * r),
    }
    for fn in contenders.values():  # warm-up (imports, minigrid's tile caches)
        fn(99)
    values: dict[str, list[tuple[float, float, int]]] = {k: [] for k in contenders}
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for k in order:
            values[k].append(timed(lambda k=k, r=r: contenders[k](r)))
    out: dict = {"episodes_per_round": episodes, "rounds": rounds}
    per_step = {k: [(w / s, c / s) for w, c, s in v] for k, v in values.items()}
    floor = statistics.median(c for _, c in per_step["minigrid_loop"])
    out["contenders"] = {
        k: {
            "median_steps_per_s": statistics.median(s / w for w, _, s in values[k]),
            "median_cpu_steps_per_s": statistics.median(s / c for _, c, s in values[k]),
            "median_cpu_us_per_step": 1e6 * statistics.median(c for _, c in v),
            "cpu_ratio_vs_minigrid_loop": statistics.median(c for _, c in v) / floor,
            "steps_per_round": [s for _, _, s in values[k]],
        }
        for k, v in per_step.items()
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/dt_collect.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "trajectory collection (steps/s)",
        "goal": "collect within ~1.5x the bare minigrid loop's CPU time per step (the env dominates)",
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "note": "shared 2-core machine; CPU time is the steadier figure",
        },
        "skill_mix": list(SKILL_MIX),
        "envs": {
            name: env_case(name, args.rounds, args.episodes)
            for name in ("MiniGrid-MemoryS7-v0", "MiniGrid-DoorKey-5x5-v0")
        },
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: {c: round(v["median_cpu_steps_per_s"]) for c, v in e["contenders"].items()}
                for k, e in result["envs"].items()
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
