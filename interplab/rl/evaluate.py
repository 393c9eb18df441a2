"""A decision transformer in its environment: rollouts conditioned on target returns, and the calibration curve.

`rollout` plays ``n_episodes`` per target return in a gymnasium vector env (``n_envs`` environments stepped
together, the model run once per step on all of them). Each environment keeps its episode's last
``cfg.context`` steps as the model's window, left-padded (``attention_mask`` False) while the episode is
shorter; the return-to-go fed at step t is the target minus the rewards received before t (the DT's
training convention: the RTG of step t includes its own reward). Episodes end at different times; a finished
environment is reset at once with the next episode's seed (``reset_mask``), so the vector env's own
autoreset (gymnasium 1.x: next-step) never fires and every recorded episode starts from a known seed.

Episode ``k`` of each target uses the environment seed ``seed + k`` (the same layouts for every target:
common random numbers, so that the calibration slope compares like with like) and, with ``temperature > 0``,
its own action-sampling stream derived from that seed; an episode is therefore reproduced exactly by a
rollout with its target and seed alone, however many environments ran beside it (`rollout` batched equals
`rollout` one environment at a time).

`evaluate_dt` turns the rollouts into a `Calibration`: per target the episode count, the mean achieved return
and its 95% Student-t interval, and the least-squares slope of achieved on target return over all episodes
with its 95% t interval (`Calibration.slope`). A target outside the return range of the training data draws a
warning naming that range: the model never saw such a return-to-go.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.model.attention import keep_fused_weights
from interplab.rl.calibration import Calibration, Slope, mean_interval
from interplab.rl.envs import env_spec, make_env
from interplab.rl.model import DecisionTransformer
from interplab.rl.trajectories import Trajectories

_SAMPLING_SALT = 0x5EED_AC75
"""mixed into an episode's seed for its action-sampling stream (the environment's own RNG uses the bare seed)"""


class PolicyConfig(Protocol):
    @property
    def context(self) -> int: ...

    @property
    def n_actions(self) -> int: ...


class Policy(Protocol):
    """What `rollout` plays: a `DecisionTransformer`, or any object with ``cfg.context``, ``cfg.n_actions``
    and ``predict`` (e.g. a scripted policy in a test)."""

    @property
    def cfg(self) -> PolicyConfig: ...

    def predict(
        self,
        rtg: Float[Tensor, "batch pos"],
        obs: Int[Tensor, "batch pos 7 7 3"],
        actions: Int[Tensor, "batch pos"],
        timesteps: Int[Tensor, "batch pos"],
        attention_mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch n_actions"]: ...


@dataclass(frozen=True)
class Rollout:
    """The episodes of a `rollout` (targets major: the ``n_episodes`` of the first target, then the next)."""

    trajectories: Trajectories
    """every episode's steps, with its environment seed (``trajectories.seeds``)"""
    targets: Float[Tensor, " episodes"]
    """float64 [episodes]: the target return each episode was conditioned on"""

    @property
    def returns(self) -> Float[Tensor, " episodes"]:
        """float32 [episodes]: the achieved (undiscounted) return of each episode"""
        return self.trajectories.returns


@dataclass
class _Episode:
    """One episode being played in a slot of the vector env."""

    index: int
    target: float
    seed: int
    rng: np.random.Generator
    obs: list[np.ndarray] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    achieved: float = 0.0
    """the rewards so far (float64; the return to go fed to the model is ``target - achieved``)"""

    def record(self, obs: np.ndarray, action: int, reward: float) -> None:
        self.obs.append(obs.copy())
        self.actions.append(action)
        self.rewards.append(reward)
        self.achieved += reward


class _Windows:
    """The model's input for each environment slot: its episode's last ``context`` steps, left-padded."""

    def __init__(self, n: int, context: int, obs_shape: tuple[int, ...]) -> None:
        self.rtg = np.zeros((n, context), np.float32)
        self.obs = np.zeros((n, context, *obs_shape), np.uint8)
        self.actions = np.zeros((n, context), np.int64)
        self.timesteps = np.zeros((n, context), np.int64)
        self.mask = np.zeros((n, context), np.bool_)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.rtg, self.obs, self.actions, self.timesteps, self.mask

    def clear(self, rows: np.ndarray) -> None:
        for a in self._arrays():
            a[rows] = 0

    def push(self, slots: Sequence[_Episode | None], obs: np.ndarray) -> None:
        """Shift the rows of the slots playing an episode one step left and write its current step (the
        observation ``obs[row]``, the return still to go, its timestep; the action unknown yet) at the end."""
        rows = np.array([i for i, ep in enumerate(slots) if ep is not None], dtype=np.int64)
        if rows.size == 0:
            return
        episodes = [ep for ep in slots if ep is not None]
        for a in self._arrays():
            a[rows, :-1] = a[rows, 1:]
        self.rtg[rows, -1] = [ep.target - ep.achieved for ep in episodes]
        self.obs[rows, -1] = obs[rows]
        self.actions[rows, -1] = 0
        self.timesteps[rows, -1] = [len(ep.actions) for ep in episodes]
        self.mask[rows, -1] = True

    def inputs(self, rows: np.ndarray, device: torch.device) -> tuple[Tensor, ...]:
        return tuple(torch.from_numpy(a[rows]).to(device) for a in self._arrays())


class _Envs:
    """``n`` environments stepped one after another without autoreset: what gymnasium's `SyncVectorEnv` does
    with ``autoreset_mode="Disabled"`` for `rollout`'s calls (``reset(seed=list, options={"reset_mask": m})``
    resets the masked ones; ``step`` returns stacked observations, rewards, terminated, truncated), without
    its per-step bookkeeping (info dicts merged, autoreset checks, array copies): ~12 us an environment step
    of MiniGrid's ~45."""

    def __init__(self, env_name: str, n: int, seed: int) -> None:
        self.envs = [make_env(env_name, seed + i) for i in range(n)]
        self.obs: np.ndarray | None = None

    def reset(
        self, *, seed: Sequence[int | None], options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        mask = None if options is None else options.get("reset_mask")
        views = [] if self.obs is None else list(self.obs)
        for i, env in enumerate(self.envs):
            if mask is None or mask[i]:
                view, _ = env.reset(seed=seed[i])
                if self.obs is None:
                    views.append(view)
                else:
                    views[i] = view
        self.obs = np.stack(views)
        return self.obs, {}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        results = [env.step(int(a)) for env, a in zip(self.envs, actions, strict=True)]
        self.obs = np.stack([r[0] for r in results])
        rewards = np.array([r[1] for r in results], np.float64)
        terminated = np.array([r[2] for r in results], np.bool_)
        truncated = np.array([r[3] for r in results], np.bool_)
        return self.obs, rewards, terminated, truncated, {}

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _vector_env(env_name: str, n: int, seed: int, asynchronous: bool) -> Any:
    """``n`` environments without autoreset (`rollout` resets each itself, with the next episode's seed)."""
    if not asynchronous:
        return _Envs(env_name, n, seed)
    from gymnasium.vector import AsyncVectorEnv, AutoresetMode

    fns = [functools.partial(make_env, env_name, seed + i) for i in range(n)]
    return AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)


def _device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


class _Decider:
    """The model's logits for the playing slots, from their windows: a `DecisionTransformer` (without active
    hooks) with the step cache runs each step through `DecisionTransformer.predict_step` (only what the new
    step changes: incremental while the episode fits the context, then the window's layers after the first on
    layer 0's cached inputs; equal to the full window to float precision); any other policy, or the cache
    off, gets ``predict`` on the full windows. Which way a step goes never depends on the other slots, so
    batched and one-environment rollouts play the same episodes."""

    def __init__(self, model: Policy, n: int, device: torch.device, cached: bool) -> None:
        self.model = model
        self.device = device
        self.cache = None
        if cached and isinstance(model, DecisionTransformer) and model.cfg.context >= 2:
            if not model.transformer.hook_registry.any_active:  # hooks see whole windows, as before
                self.cache = model.step_cache(n)

    def clear(self, rows: np.ndarray) -> None:
        if self.cache is not None and rows.size:
            self.cache.clear(torch.from_numpy(rows))

    def logits(self, windows: _Windows, rows: np.ndarray) -> Tensor:
        """float [len(rows), n_actions]: the logits of the slots ``rows``."""
        if self.cache is None:
            rtg, obs, actions, timesteps, mask = windows.inputs(rows, self.device)
            return self.model.predict(rtg, obs, actions, timesteps, attention_mask=mask)
        assert isinstance(self.model, DecisionTransformer)
        return self.model.predict_step(
            self.cache,
            torch.from_numpy(rows),
            torch.from_numpy(windows.rtg[rows, -1]),
            torch.from_numpy(windows.obs[rows, -1]),
            torch.from_numpy(windows.actions[rows, -2]),
            torch.from_numpy(windows.timesteps[rows, -1]),
        )


def _act(logits: Tensor, episodes: list[_Episode], temperature: float, n_actions: int) -> np.ndarray:
    """The action of each playing slot: greedy (the first maximum) at temperature 0, else a sample from
    softmax(logits / temperature) by the Gumbel-max trick on each episode's own stream (so that a sample does
    not depend on the other slots)."""
    if tuple(logits.shape) != (len(episodes), n_actions):
        raise ValueError(
            f"model.predict returned logits of shape {tuple(logits.shape)}, expected ({len(episodes)}, "
            f"{n_actions}) (batch, n_actions)"
        )
    values = logits.detach().double().cpu().numpy()
    if temperature == 0:
        return values.argmax(-1)
    noise = np.stack([ep.rng.gumbel(size=n_actions) for ep in episodes])
    return (values / temperature + noise).argmax(-1)


def _check_rollout_args(
    targets: list[float], n_episodes: int, n_envs: int, temperature: float, context: int, n_actions: int
) -> None:
    if not targets or not all(math.isfinite(t) for t in targets):
        raise ValueError(f"target_returns must be a non-empty list of finite numbers, got {targets}")
    if n_episodes < 1:
        raise ValueError(f"n_episodes (per target) must be >= 1, got {n_episodes}")
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be 0 (greedy) or a positive number, got {temperature}")
    if context < 1 or n_actions < 1:
        raise ValueError(f"the model's cfg needs context >= 1 and n_actions >= 1, got {context}, {n_actions}")


def rollout(
    model: Policy,
    env_name: str,
    target_returns: Sequence[float],
    n_episodes: int,
    *,
    seed: int = 0,
    n_envs: int = 16,
    temperature: float = 0.0,
    asynchronous: bool = False,
    step_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Rollout:
    """Play ``n_episodes`` episodes per target return of ``model`` in ``env_name``, ``n_envs`` environments
    at a time (see the module docstring); ``temperature`` 0 acts greedily, > 0 samples. ``asynchronous``: step
    the environments in worker processes (gymnasium's `AsyncVectorEnv`: worth it with free cores, since
    MiniGrid's own step, ~0.2-0.4 ms of Python, is what batching the model cannot amortise); the episodes are
    the same either way. ``step_cache`` (a `DecisionTransformer`, on by default): compute only what each step
    changes (`DecisionTransformer.predict_step`: the new tokens against cached keys and values while the
    episode fits the context, then layer 0's cached inputs with the later layers recomputed on the window;
    equal to the full window to float precision). Measured at the ``memory-dt-tiny`` size on one CPU thread
    (`benchmarks/bench_dt_eval.py`): 1.38x faster than the full window with 16 environments, the same with
    one. ``step_cache=False``: ``predict`` on the full window at every step. ``progress(done, total)`` is
    called as episodes finish.

    >>> from interplab.rl import DTConfig, DecisionTransformer
    >>> model = DecisionTransformer(DTConfig(env="MiniGrid-Empty-5x5-v0", d_model=32, n_layers=1, n_heads=2,
    ...                                      d_head=16, d_mlp=64, context=4, max_timestep=100))
    >>> r = rollout(model, "MiniGrid-Empty-5x5-v0", [0.5, 1.0], 3, n_envs=4)
    >>> r.trajectories.n_episodes, r.targets.tolist(), r.trajectories.seeds.tolist()
    (6, [0.5, 0.5, 0.5, 1.0, 1.0, 1.0], [0, 1, 2, 0, 1, 2])
    """
    targets = [float(t) for t in target_returns]
    context, n_actions = int(model.cfg.context), int(model.cfg.n_actions)
    _check_rollout_args(targets, n_episodes, n_envs, temperature, context, n_actions)
    spec = env_spec(env_name)
    plan = [(t, seed + k) for t in targets for k in range(n_episodes)]
    total = len(plan)
    n = min(n_envs, total)
    device = _device(model)

    def start(index: int) -> _Episode:
        target, ep_seed = plan[index]
        rng = np.random.default_rng(np.random.SeedSequence([ep_seed, _SAMPLING_SALT]))
        return _Episode(index=index, target=target, seed=ep_seed, rng=rng)

    slots: list[_Episode | None] = [start(i) for i in range(n)]
    finished: list[_Episode] = []
    next_index = n
    windows = _Windows(n, context, tuple(spec.obs_shape))
    envs = _vector_env(env_name, n, seed, asynchronous)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    decider = _Decider(model, n, device, step_cache)
    # the weights are fixed for the whole rollout: each attention keeps its fused QKV matrix between steps
    kept = keep_fused_weights(model) if isinstance(model, torch.nn.Module) else nullcontext()
    with kept:
        try:
            obs, _ = envs.reset(seed=[plan[i][1] for i in range(n)])
            windows.push(slots, obs)
            while len(finished) < total:
                rows = np.array([i for i, ep in enumerate(slots) if ep is not None], dtype=np.int64)
                playing = [ep for ep in slots if ep is not None]
                with torch.inference_mode():
                    logits = decider.logits(windows, rows)
                chosen = _act(logits, playing, temperature, n_actions)
                step_actions = np.zeros(n, np.int64)  # an idle slot (no episode left to play) turns left
                step_actions[rows] = chosen
                windows.actions[rows, -1] = chosen
                obs, rewards, terminated, truncated, _ = envs.step(step_actions)
                for i, ep, action in zip(rows, playing, chosen, strict=True):
                    ep.record(windows.obs[i, -1], int(action), float(np.float32(rewards[i])))
                ended = np.logical_or(terminated, truncated)
                if ended.any():
                    seeds: list[int | None] = [None] * n  # an idle slot plays on from an unrecorded reset
                    for i in np.flatnonzero(ended):
                        if (done := slots[i]) is not None:
                            finished.append(done)
                            if progress is not None:
                                progress(len(finished), total)
                        slots[i] = start(next_index) if next_index < total else None
                        if slots[i] is not None:
                            seeds[i] = plan[next_index][1]
                            next_index += 1
                    obs, _ = envs.reset(seed=seeds, options={"reset_mask": ended})
                    windows.clear(np.flatnonzero(ended))
                    decider.clear(np.flatnonzero(ended))
                windows.push(slots, obs)
        finally:
            envs.close()
            if was_training:
                model.train()  # type: ignore[attr-defined]
    episodes = sorted(finished, key=lambda ep: ep.index)
    return Rollout(
        trajectories=_trajectories(env_name, episodes, temperature),
        targets=torch.tensor([ep.target for ep in episodes], dtype=torch.float64),
    )


def _trajectories(env_name: str, episodes: list[_Episode], temperature: float) -> Trajectories:
    lengths = np.array([len(ep.actions) for ep in episodes], np.int64)
    dones = np.zeros(int(lengths.sum()), np.bool_)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dones[starts[1:] - 1] = True
    return Trajectories(
        env=env_name,
        obs=torch.from_numpy(np.stack([o for ep in episodes for o in ep.obs])),
        actions=torch.tensor([a for ep in episodes for a in ep.actions], dtype=torch.int64),
        rewards=torch.tensor([r for ep in episodes for r in ep.rewards], dtype=torch.float32),
        dones=torch.from_numpy(dones),
        episode_starts=torch.from_numpy(starts),
        seeds=torch.tensor([ep.seed for ep in episodes], dtype=torch.int64),
        source=f"dt_rollout(temperature={temperature:g})",
    )


def _data_range(data: Trajectories | tuple[float, float] | None) -> tuple[float, float] | None:
    if data is None:
        return None
    if isinstance(data, Trajectories):
        returns = np.asarray(data.returns, np.float64)
        if returns.size == 0:
            raise ValueError("the training data has no episodes to take a return range from")
        return float(returns.min()), float(returns.max())
    lo, hi = (float(v) for v in data)
    if not lo <= hi:
        raise ValueError(f"data_range must be (lowest, highest) return, got {data}")
    return lo, hi


def evaluate_dt(
    model: Policy,
    env_name: str,
    target_returns: Sequence[float],
    n_episodes_per_target: int,
    *,
    data: Trajectories | tuple[float, float] | None = None,
    seed: int = 0,
    n_envs: int = 16,
    temperature: float = 0.0,
    keep_rollouts: bool = True,
    asynchronous: bool = False,
    step_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """The calibration curve of ``model`` on ``env_name``: `rollout` at each target return (distinct), then
    per target the mean achieved return with its 95% t interval and the slope (see `Calibration`).

    ``data``: the training trajectories (or their (lowest, highest) return): a target outside their return
    range warns, naming the range. ``keep_rollouts``: keep the episodes (``Calibration.rollouts``).
    ``seed``, ``n_envs``, ``temperature``, ``asynchronous``, ``step_cache``, ``progress``: as for `rollout`."""
    targets = [float(t) for t in target_returns]
    if len(set(targets)) != len(targets):
        raise ValueError(f"target_returns must be distinct, got {targets}")
    data_range = _data_range(data)
    if data_range is not None:
        outside = [t for t in targets if not data_range[0] <= t <= data_range[1]]
        if outside:
            warnings.warn(
                f"target returns {outside} lie outside the training data's return range "
                f"[{data_range[0]:.4g}, {data_range[1]:.4g}]: the model never saw such a return-to-go",
                stacklevel=2,
            )
    r = rollout(model, env_name, targets, n_episodes_per_target, seed=seed, n_envs=n_envs,
                temperature=temperature, asynchronous=asynchronous, step_cache=step_cache,
                progress=progress)  # fmt: skip
    trajs = r.trajectories
    return Calibration(
        env=env_name,
        targets=tuple(targets),
        episode_targets=tuple(float(t) for t in r.targets),
        episode_returns=tuple(float(x) for x in r.returns),
        episode_lengths=tuple(int(n) for n in trajs.lengths),
        episode_seeds=tuple(int(s) for s in trajs.seeds),
        temperature=temperature,
        max_return=env_spec(env_name).max_return,
        data_range=data_range,
        rollouts=trajs if keep_rollouts else None,
    )


__all__ = ["Calibration", "Policy", "Rollout", "Slope", "evaluate_dt", "mean_interval", "rollout"]
