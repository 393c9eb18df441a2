"""Decision-transformer evaluation: episodes/s batched across a vector env vs one environment at a time.

Contenders, interleaved in rounds on the same model (the ``memory-dt-tiny`` preset's DecisionTransformer,
randomly initialised: its episodes mostly run to MemoryS7's 245-step limit) and the same episodes (targets x
seeds):
- ``batched``: `rollout` with ``n_envs=16`` and ``step_cache=False`` (one model call per step for all
  environments, on their full windows);
- ``batched_async``: the same with the environments in worker processes (``asynchronous=True``; its CPU
  time counts this process only, so compare its wall time);
- ``one_env``: `rollout` with ``n_envs=1`` (the same code, one environment);
- ``batched_cached`` and ``one_env_cached``: the two with ``step_cache=True`` (`predict_step`: each step's
  new tokens only while the episode fits the context, then layer 0's cached inputs and the later layers
  recomputed on the window);
- ``bare_loop``: a hand-written loop over one gymnasium env calling ``model.predict`` on a growing window
  (what one writes without interplab; checks that ``one_env`` is a fair baseline).
Medians over rounds of wall and CPU time per episode; ratios against ``one_env``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_dt_eval.py --out benchmarks/results/dt_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from interplab.rl import DecisionTransformer, make_env, rollout
from interplab.rl.train import dt_preset

ENV = "MiniGrid-MemoryS7-v0"


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bare_loop(model: DecisionTransformer, targets: list[float], n_episodes: int) -> list[float]:
    """One env, one episode after another: the window is the episode's last ``context`` steps, unpadded."""
    k = model.cfg.context
    returns = []
    for target in targets:
        for seed in range(n_episodes):
            env = make_env(ENV)
            obs, _ = env.reset(seed=seed)
            rtg, views, actions, steps = [target], [obs], [0], [0]
            total, done = 0.0, False
            while not done:
                with torch.no_grad():
                    logits = model.predict(
                        torch.tensor([rtg[-k:]], dtype=torch.float32),
                        torch.from_numpy(np.stack(views[-k:]))[None],
                        torch.tensor([actions[-k:]]),
                        torch.tensor([steps[-k:]]),
                    )
                action = int(logits[0].argmax())
                actions[-1] = action
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
                rtg.append(target - total)
                views.append(obs)
                actions.append(0)
                steps.append(steps[-1] + 1)
            returns.append(total)
            env.close()
    return returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/dt_eval.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=8, help="episodes per target (2 targets)")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    cfg, _ = dt_preset("memory-dt-tiny")
    torch.manual_seed(0)
    model = DecisionTransformer(cfg).eval()
    targets = [0.5, 1.0]
    n_total = len(targets) * args.episodes

    outputs: dict[str, list] = {}

    def contender(name, fn):
        def run():
            outputs[name] = fn()

        return run

    variants = {  # rollout's settings per contender
        "batched": {"n_envs": args.n_envs, "step_cache": False},
        "batched_async": {"n_envs": args.n_envs, "asynchronous": True, "step_cache": False},
        "one_env": {"n_envs": 1, "step_cache": False},
        "batched_cached": {"n_envs": args.n_envs, "step_cache": True},
        "one_env_cached": {"n_envs": 1, "step_cache": True},
    }
    contenders = {
        name: contender(
            name, lambda kw=kw: rollout(model, ENV, targets, args.episodes, **kw).returns.tolist()
        )
        for name, kw in variants.items()
    }
    contenders["bare_loop"] = contender("bare_loop", lambda: bare_loop(model, targets, args.episodes))
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for r in range(args.rounds):  # interleaved, the order alternating
        for name in list(contenders) if r % 2 == 0 else list(reversed(contenders)):
            samples[name].append(timed(contenders[name]))
    steps = len(rollout(model, ENV, targets, args.episodes, n_envs=args.n_envs).trajectories.actions)
    same = all(outputs[name] == outputs["one_env"] for name in contenders)
    result: dict = {
        "benchmark": "decision-transformer evaluation episodes/s",
        "goal": "batched (n_envs=16) >= 5x a one-env loop",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "cpu_count": os.cpu_count(), "note": "shared 2-core machine; CPU time is the steadier figure"},
        "setup": {"env": ENV, "model": "memory-dt-tiny preset, random init", "model_config": cfg.to_dict(),
                  "targets": targets, "episodes_per_round": n_total, "steps_per_round": steps,
                  "n_envs": args.n_envs, "rounds": args.rounds},
        "batched_returns_equal_one_env": same,
        "contenders": {},
    }  # fmt: skip
    for name, values in samples.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        result["contenders"][name] = {
            "median_wall_s_per_round": wall,
            "median_cpu_s_per_round": cpu,
            "episodes_per_s_wall": n_total / wall,
            "episodes_per_s_cpu": n_total / cpu,
            "rounds_wall_s": [v[0] for v in values],
        }
    base = result["contenders"]["one_env"]
    for value in result["contenders"].values():
        value["speedup_vs_one_env_wall"] = base["median_wall_s_per_round"] / value["median_wall_s_per_round"]
        value["speedup_vs_one_env_cpu"] = base["median_cpu_s_per_round"] / value["median_cpu_s_per_round"]
    path = Path(args.out)
    if path.is_file():  # the previous measurement, summarised
        old = json.loads(path.read_text())
        keep = (
            "median_cpu_s_per_round",
            "median_wall_s_per_round",
            "speedup_vs_one_env_cpu",
            "speedup_vs_one_env_wall",
        )
        result["before"] = {
            "note": "the previous result in this file (its machine load may differ: compare ratios)",
            "contenders": {k: {f: v.get(f) for f in keep} for k, v in old.get("contenders", {}).items()},
        }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    for name, value in result["contenders"].items():
        print(f"{name:10s} {value['episodes_per_s_cpu']:7.2f} episodes/s cpu ({value['episodes_per_s_wall']:7.2f} wall)  "
              f"speedup vs one env {value['speedup_vs_one_env_cpu']:.2f}x cpu, {value['speedup_vs_one_env_wall']:.2f}x wall")  # fmt: skip
    print(f"batched returns equal one-env returns: {same}")


if __name__ == "__main__":
    main()
