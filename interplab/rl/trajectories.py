"""Trajectory data sets: episodes of (observation, action, reward, done) on one flat step axis, written as
sharded safetensors with a manifest, resumable.

On disk (a folder; no pickle)::

    manifest.json               {kind: trajectories, version, env, source, settings, obs_shape, complete,
                                 n_episodes, n_steps, shards: [{file, episodes, steps, bytes}, ...]}
    shard_00000.safetensors     obs uint8 [n, 7, 7, 3], actions int64 [n], rewards float32 [n], dones bool [n],
                                episode_starts int64 [e + 1] (offsets into this shard), seeds int64 [e]
    shard_00001.safetensors     ...

Shards hold whole episodes. A shard file is written (atomically) before the manifest that lists it, so a
collection killed at any moment leaves a folder whose manifest lists only complete shards:
`TrajectoryWriter` reopens it and continues after them. ``complete`` says whether the collection finished.

>>> t = Trajectories(env="MiniGrid-Empty-5x5-v0", obs=torch.zeros(3, 7, 7, 3, dtype=torch.uint8),
...                  actions=torch.tensor([2, 2, 1]), rewards=torch.tensor([0.0, 0.9, 0.8]),
...                  dones=torch.tensor([False, True, True]), episode_starts=torch.tensor([0, 2, 3]),
...                  seeds=torch.tensor([0, 1]), source="hand-made")
>>> t.returns, t.rtg, t.timesteps
(tensor([0.9000, 0.8000]), tensor([0.9000, 0.9000, 0.8000]), tensor([0, 1, 0]))
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from interplab import runs
from interplab.io import atomic_write_json, load_tensors, read_json, save_tensors
from interplab.plots import save_result
from interplab.rl.envs import env_spec

KIND = "trajectories"
"""The ``kind`` of a trajectory folder's ``manifest.json``."""
VERSION = 1
"""The manifest version this interplab writes (and the newest it reads)."""
SHARD_STEPS = 20_000
"""Steps per shard by default (a shard holds whole episodes, so it may hold a little more)."""
_FIELDS = ("obs", "actions", "rewards", "dones", "episode_starts", "seeds")


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Trajectories:
    """Episodes of one environment on one flat step axis (``N`` steps, ``E`` episodes): episode ``e`` is steps
    ``episode_starts[e]:episode_starts[e + 1]``. Arrays are torch tensors (numpy arrays are converted)."""

    env: str
    """the environment's gymnasium id (one of `SUPPORTED_ENVS`)"""
    obs: Tensor
    """uint8 [N, 7, 7, 3]: the observation each action was taken in"""
    actions: Tensor
    """int64 [N]: the action taken"""
    rewards: Tensor
    """float32 [N]: the reward that action earned"""
    dones: Tensor
    """bool [N]: the episode ended after this step (terminated or truncated)"""
    episode_starts: Tensor
    """int64 [E + 1]: offsets of the episodes (0 first, N last)"""
    seeds: Tensor
    """int64 [E]: the reset seed of each episode (replaying its actions from it gives the same steps)"""
    source: str = ""
    """what produced the data (``expert(eps=0.1)``, ``ppo``, ...)"""

    def __post_init__(self) -> None:
        spec = env_spec(self.env)
        obs = torch.as_tensor(self.obs)
        if obs.dtype != torch.uint8:
            raise ValueError(f"Trajectories: obs must be uint8 (MiniGrid's image encoding), got {obs.dtype}")
        if obs.dim() != 4 or tuple(obs.shape[1:]) != spec.obs_shape:
            raise ValueError(
                f"Trajectories: mismatched observation shapes: obs is {list(obs.shape)}, but {self.env} "
                f"observations are {list(spec.obs_shape)} (expected [N, {', '.join(map(str, spec.obs_shape))}])"
            )
        n = obs.shape[0]
        actions = _vector(self.actions, "actions", n, torch.int64)
        rewards = _vector(self.rewards, "rewards", n, torch.float32)
        dones = _vector(self.dones, "dones", n, torch.bool)
        starts = _vector(self.episode_starts, "episode_starts", None, torch.int64)
        if starts.numel() == 0 or starts[0] != 0 or starts[-1] != n:
            raise ValueError(
                f"Trajectories: episode_starts must run from 0 to the number of steps ({n}), got "
                f"{_head(starts)}"
            )
        lengths = starts.diff()
        if (lengths <= 0).any():
            e = int((lengths <= 0).nonzero()[0])
            raise ValueError(f"Trajectories: episode {e} is empty (episode_starts {_head(starts)})")
        seeds = _vector(self.seeds, "seeds", starts.numel() - 1, torch.int64)
        if n and (actions.min() < 0 or actions.max() >= spec.n_actions):
            bad = int(actions[(actions < 0) | (actions >= spec.n_actions)][0])
            raise ValueError(f"Trajectories: action {bad} outside {self.env}'s 0..{spec.n_actions - 1}")
        inner = dones.clone()
        inner[starts[1:] - 1] = False
        if inner.any():
            step = int(inner.nonzero()[0])
            raise ValueError(f"Trajectories: step {step} is done but is not the last step of its episode")
        for name, value in zip(_FIELDS, (obs, actions, rewards, dones, starts, seeds), strict=True):
            object.__setattr__(self, name, value)

    # sizes and derived arrays

    @property
    def n_episodes(self) -> int:
        return self.episode_starts.numel() - 1

    @property
    def n_steps(self) -> int:
        return self.obs.shape[0]

    @property
    def lengths(self) -> Tensor:
        """int64 [E]: steps per episode."""
        return self.episode_starts.diff()

    @property
    def episode_index(self) -> Tensor:
        """int64 [N]: the episode each step belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_episodes), self.lengths)

    @property
    def returns(self) -> Tensor:
        """float32 [E]: the undiscounted return of each episode."""
        total = torch.zeros(self.n_episodes, dtype=torch.float64)
        return total.index_add_(0, self.episode_index, self.rewards.double()).float()

    @property
    def rtg(self) -> Tensor:
        """float32 [N]: the undiscounted return to go from each step, its own reward included."""
        r = self.rewards.double()
        before = r.cumsum(0) - r  # the sum of the rewards before each step, over the whole data set
        to_end = before[self.episode_starts[1:] - 1] + r[self.episode_starts[1:] - 1]
        return (to_end[self.episode_index] - before).float()

    @property
    def timesteps(self) -> Tensor:
        """int64 [N]: each step's index within its episode (0 first)."""
        return torch.arange(self.n_steps) - torch.repeat_interleave(self.episode_starts[:-1], self.lengths)

    # selecting and joining

    def episode(self, e: int) -> Trajectories:
        """Episode ``e`` alone (negative ``e`` counts from the end)."""
        if not -self.n_episodes <= e < self.n_episodes:
            raise IndexError(f"episode {e} out of range: the data has {self.n_episodes} episodes")
        return self.select([e % self.n_episodes])

    def select(self, episodes: Sequence[int] | Tensor) -> Trajectories:
        """The given episodes (indices, in the given order) as a new data set."""
        idx = torch.as_tensor(episodes, dtype=torch.int64).reshape(-1)
        if idx.numel() and (idx.min() < -self.n_episodes or idx.max() >= self.n_episodes):
            raise IndexError(f"episode indices {_head(idx)} out of range: the data has {self.n_episodes}")
        idx = idx % max(self.n_episodes, 1)
        lengths = self.lengths[idx]
        steps = torch.repeat_interleave(self.episode_starts[idx], lengths) + (
            torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        )
        return Trajectories(
            env=self.env,
            obs=self.obs[steps],
            actions=self.actions[steps],
            rewards=self.rewards[steps],
            dones=self.dones[steps],
            episode_starts=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            seeds=self.seeds[idx],
            source=self.source,
        )

    @staticmethod
    def concat(parts: Sequence[Trajectories]) -> Trajectories:
        """The episodes of ``parts`` one after another (one environment; sources joined with ``" + "``)."""
        if not parts:
            raise ValueError("Trajectories.concat needs at least one data set")
        envs = sorted({p.env for p in parts})
        if len(envs) > 1:
            raise ValueError(f"cannot concatenate trajectories of different environments: {', '.join(envs)}")
        offsets = torch.tensor([0] + [p.n_steps for p in parts[:-1]]).cumsum(0)
        sources = list(dict.fromkeys(p.source for p in parts if p.source))
        return Trajectories(
            env=parts[0].env,
            obs=torch.cat([p.obs for p in parts]),
            actions=torch.cat([p.actions for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]),
            dones=torch.cat([p.dones for p in parts]),
            episode_starts=torch.cat(
                [torch.zeros(1, dtype=torch.int64)]
                + [p.episode_starts[1:] + o for p, o in zip(parts, offsets, strict=True)]
            ),
            seeds=torch.cat([p.seeds for p in parts]),
            source=" + ".join(sources),
        )

    # files and views

    def save(self, path: str | Path, *, shard_steps: int = SHARD_STEPS) -> Path:
        """Write the data set as a trajectory folder (`load_trajectories` is the exact inverse). An existing
        trajectory folder at ``path`` is replaced; a folder of another kind is refused."""
        path = Path(path)
        replace = _check_writable(path)
        target = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) if replace else path
        try:
            writer = TrajectoryWriter(target, self.env, source=self.source, shard_steps=shard_steps)
            writer.add(self)
            writer.close()
            if replace:  # the old data set stays whole until the new one is: swap the folders
                old = path.with_name(target.name + ".old")
                path.rename(old)
                target.rename(path)
                shutil.rmtree(old)
        finally:
            if target.exists() and target != path:
                shutil.rmtree(target)
        return path

    def summary(self) -> TrajectorySummary:
        """Returns and episode lengths at a glance (``.plot()``: their histograms)."""
        return TrajectorySummary(
            env=self.env, source=self.source, returns=self.returns, lengths=self.lengths, n_steps=self.n_steps
        )

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return f"Trajectories({self.env}, {self.n_episodes:,} episodes, {self.n_steps:,} steps{src})"


def _vector(value: Any, name: str, n: int | None, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    if t.dim() != 1 or (n is not None and t.numel() != n):
        want = f"[{n}]" if n is not None else "1-d"
        raise ValueError(f"Trajectories: {name} must be {want}, got shape {list(t.shape)}")
    if dtype == torch.bool and t.dtype != torch.bool:
        raise ValueError(f"Trajectories: {name} must be bool, got {t.dtype}")
    if dtype == torch.int64 and (t.is_floating_point() or t.dtype == torch.bool):
        raise ValueError(f"Trajectories: {name} must be integers, got {t.dtype}")
    return t.to(dtype).contiguous()


def _head(t: Tensor, n: int = 6) -> str:
    items = t.tolist()
    return str(items[:n])[:-1] + (", ...]" if len(items) > n else "]")


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class TrajectorySummary:
    """Returns and lengths of a data set's episodes; ``.plot()`` draws their histograms."""

    env: str
    """the environment"""
    source: str
    """what produced the data"""
    returns: Tensor
    """float32 [E]: each episode's return"""
    lengths: Tensor
    """int64 [E]: each episode's length in steps"""
    n_steps: int
    """steps in all"""

    @property
    def n_episodes(self) -> int:
        return self.returns.numel()

    @property
    def success_rate(self) -> float:
        """The fraction of episodes with a positive return (MiniGrid pays only on success)."""
        return float((self.returns > 0).float().mean()) if self.n_episodes else 0.0

    @property
    def return_range(self) -> tuple[float, float]:
        """The smallest and largest return in the data (what RTG conditioning can be asked for)."""
        if not self.n_episodes:
            return (0.0, 0.0)
        return (float(self.returns.min()), float(self.returns.max()))

    def to_dict(self) -> dict[str, Any]:
        r, n = self.returns.double(), self.lengths.double()
        return {
            "env": self.env,
            "source": self.source,
            "n_episodes": self.n_episodes,
            "n_steps": self.n_steps,
            "success_rate": self.success_rate,
            "return_mean": float(r.mean()) if self.n_episodes else 0.0,
            "return_std": float(r.std(correction=0)) if self.n_episodes else 0.0,
            "return_range": list(self.return_range),
            "length_mean": float(n.mean()) if self.n_episodes else 0.0,
            "length_range": [int(self.lengths.min()), int(self.lengths.max())] if self.n_episodes else [0, 0],
            "returns": self.returns.tolist(),
            "lengths": self.lengths.tolist(),
        }

    def plot(self, *, bins: int = 30) -> Any:
        """Two histograms side by side: episode returns and episode lengths."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        d = self.to_dict()
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=(
                f"return (mean {d['return_mean']:.3f}, success {self.success_rate:.0%})",
                f"episode length (mean {d['length_mean']:.1f})",
            ),
        )
        fig.add_trace(go.Histogram(x=d["returns"], nbinsx=bins, name="return"), row=1, col=1)
        fig.add_trace(go.Histogram(x=d["lengths"], nbinsx=bins, name="length"), row=1, col=2)
        fig.update_xaxes(title_text="episode return", row=1, col=1)
        fig.update_xaxes(title_text="steps", row=1, col=2)
        fig.update_yaxes(title_text="episodes", row=1, col=1)
        fig.update_layout(
            title=f"{self.env}: {self.n_episodes:,} episodes, {self.n_steps:,} steps"
            + (f" ({self.source})" if self.source else ""),
            template="plotly_white",
            showlegend=False,
            bargap=0.05,
        )
        return fig

    def save(self, path: str | Path) -> Path:
        """``.json`` (a result document), ``.html``/``.png``/``.svg`` (the picture)."""
        return save_result(self, path)

    def __repr__(self) -> str:
        if not self.n_episodes:
            return f"TrajectorySummary({self.env}: no episodes)"
        d = self.to_dict()
        lo, hi = self.return_range
        return (
            f"TrajectorySummary({self.env}{', ' + self.source if self.source else ''}: {self.n_episodes:,} "
            f"episodes, {self.n_steps:,} steps; return {d['return_mean']:.3f} ± {d['return_std']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], success {self.success_rate:.0%}; length {d['length_mean']:.1f} "
            f"[{d['length_range'][0]}, {d['length_range'][1]}])"
        )


# the folder


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The folder's manifest when it is a trajectory folder; None when the folder has no manifest; a folder of
    another kind raises `RunError` saying what it is."""
    file = path / runs.MANIFEST
    if not file.is_file():
        if path.is_dir() and runs.detect(path) is not None:
            raise runs.RunError(f"{path} is {runs.describe(path)}; expected a trajectory data set ({KIND})")
        return None
    data = read_json(file)
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise runs.RunError(f"{path} is {runs.describe(path)}; expected a trajectory data set ({KIND})")
    if int(data.get("version", 0)) > VERSION:
        raise runs.RunError(
            f"{file} is a trajectory manifest of version {data['version']}, written by a newer interplab "
            f"(this one reads up to version {VERSION}): upgrade interplab"
        )
    return data


def _check_writable(path: Path) -> bool:
    """Whether ``path`` already holds a trajectory data set; a file or a folder of another kind raises."""
    if path.exists() and not path.is_dir():
        raise runs.RunError(f"{path} is a file; a trajectory data set is a folder")
    return path.is_dir() and _read_manifest(path) is not None


def _write_manifest(file: Path, data: dict[str, Any]) -> None:
    try:
        runs.write_json(file, KIND, data, version=VERSION)
    except ValueError:  # runs.Kind does not list "trajectories" yet: the same document, written directly
        atomic_write_json(file, {"kind": KIND, "version": VERSION, **data})


def load_trajectories(
    path: str | Path, *, env: str | None = None, allow_partial: bool = False
) -> Trajectories:
    """The data set in a trajectory folder (`Trajectories.save` / `TrajectoryWriter` wrote it). ``env``: the
    environment the caller expects (data of another raises). An unfinished collection raises unless
    ``allow_partial`` (then its complete shards are read)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no trajectory data set at {path}")
    manifest = _read_manifest(path)
    if manifest is None:
        raise runs.RunError(f"{path} is {runs.describe(path)}; expected a trajectory data set ({KIND})")
    if env is not None:
        env_spec(env)
        if manifest["env"] != env:
            raise ValueError(f"{path} holds trajectories of {manifest['env']}, not of {env}")
    if not manifest.get("complete", False) and not allow_partial:
        raise ValueError(
            f"{path} is an unfinished collection ({manifest['n_episodes']:,} episodes in complete shards): "
            "rerun the collection to resume it, or pass allow_partial=True to read what is there"
        )
    parts = [_read_shard(path, entry, manifest) for entry in manifest["shards"]]
    if not parts:
        return _empty(manifest["env"], manifest.get("source", ""))
    out = Trajectories.concat(parts)
    if out.n_steps != manifest["n_steps"] or out.n_episodes != manifest["n_episodes"]:
        raise ValueError(
            f"{path}: the shards hold {out.n_episodes} episodes / {out.n_steps} steps but the manifest says "
            f"{manifest['n_episodes']} / {manifest['n_steps']} (damaged?)"
        )
    return out


def _read_shard(path: Path, entry: Mapping[str, Any], manifest: Mapping[str, Any]) -> Trajectories:
    file = path / entry["file"]
    if not file.is_file():
        raise FileNotFoundError(f"{path}: shard {entry['file']} listed in the manifest is missing")
    if file.stat().st_size != entry["bytes"]:
        raise ValueError(
            f"{file} has {file.stat().st_size:,} bytes but the manifest says {entry['bytes']:,} (damaged?)"
        )
    t = load_tensors(file)
    missing = [k for k in _FIELDS if k not in t]
    if missing:
        raise ValueError(f"{file} is not a trajectory shard (no {', '.join(missing)})")
    return Trajectories(env=manifest["env"], source=manifest.get("source", ""), **{k: t[k] for k in _FIELDS})


def _empty(env: str, source: str) -> Trajectories:
    shape = env_spec(env).obs_shape
    return Trajectories(
        env=env,
        obs=torch.zeros(0, *shape, dtype=torch.uint8),
        actions=torch.zeros(0, dtype=torch.int64),
        rewards=torch.zeros(0),
        dones=torch.zeros(0, dtype=torch.bool),
        episode_starts=torch.zeros(1, dtype=torch.int64),
        seeds=torch.zeros(0, dtype=torch.int64),
        source=source,
    )


@dataclass(frozen=True)
class _Shard:
    file: str
    episodes: int
    steps: int
    bytes: int


@dataclass(eq=False)
class TrajectoryWriter:
    """Appends whole episodes to a trajectory folder in shards of about ``shard_steps`` steps; resumable.

    Opening a folder that already holds a collection of the same ``env``, ``source`` and ``settings`` continues
    it after its last complete shard (`episodes_written` says how many episodes are on disk: a collector starts
    there); different settings, another environment, or a folder of another kind raise. Episodes are buffered
    in memory and written shard by shard (each shard before the manifest that lists it); `close` writes the
    rest and marks the collection complete.

    >>> w = TrajectoryWriter("data", "MiniGrid-Empty-5x5-v0", source="hand-made")
    >>> w.add_episode(obs=torch.zeros(2, 7, 7, 3, dtype=torch.uint8), actions=[2, 2], rewards=[0.0, 0.5], seed=0)
    >>> w.close()
    Trajectories(MiniGrid-Empty-5x5-v0, 1 episodes, 2 steps, source='hand-made')
    """

    path: Path
    env: str
    source: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """what produced the data (collector arguments): a resumed collection must have the same"""
    shard_steps: int = SHARD_STEPS
    _shards: list[_Shard] = field(init=False, default_factory=list)
    _buffer: list[Trajectories] = field(init=False, default_factory=list)
    _buffered_steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        env_spec(self.env)
        if self.shard_steps < 1:
            raise ValueError(f"shard_steps must be >= 1, got {self.shard_steps}")
        self.settings = dict(self.settings)
        if not _check_writable(self.path):
            return
        manifest = _read_manifest(self.path)
        assert manifest is not None
        if manifest["env"] != self.env:
            raise ValueError(
                f"{self.path} holds trajectories of {manifest['env']}; cannot add {self.env} episodes there "
                "(choose another folder)"
            )
        mine, theirs = _jsonable(self.settings), dict(manifest.get("settings", {}))
        if mine != theirs or manifest.get("source", "") != self.source:
            diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
            what = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
            what = what or f"source {manifest.get('source', '')!r} there, {self.source!r} now"
            raise ValueError(f"{self.path} holds a collection with other settings ({what}); use a new folder")
        self._shards = [_Shard(**s) for s in manifest["shards"]]
        for s in self._shards:  # a listed shard must be whole: it was written before the manifest named it
            _read_shard(self.path, s.__dict__, manifest)

    @property
    def n_shards(self) -> int:
        """Complete shards on disk."""
        return len(self._shards)

    @property
    def episodes_written(self) -> int:
        """Episodes in complete shards on disk (a resumed collection continues from here)."""
        return sum(s.episodes for s in self._shards)

    @property
    def n_episodes(self) -> int:
        """Episodes on disk plus those buffered."""
        return self.episodes_written + sum(t.n_episodes for t in self._buffer)

    def add(self, trajectories: Trajectories) -> None:
        """Append whole episodes (written as soon as a shard's worth is buffered)."""
        if trajectories.env != self.env:
            raise ValueError(f"cannot add {trajectories.env} episodes to a {self.env} data set ({self.path})")
        self._buffer.append(trajectories)
        self._buffered_steps += trajectories.n_steps
        if self._buffered_steps < self.shard_steps:
            return
        data = Trajectories.concat(self._buffer)
        ends = data.episode_starts[1:]
        first = 0
        while int(ends[-1]) - int(data.episode_starts[first]) >= self.shard_steps:
            # the fewest episodes from ``first`` on that make up a shard
            last = int(torch.searchsorted(ends, data.episode_starts[first] + self.shard_steps))
            self._buffer = [data.select(range(first, last + 1))]
            self.flush()
            first = last + 1
        self._buffer = [data.select(range(first, data.n_episodes))] if first < data.n_episodes else []
        self._buffered_steps = sum(t.n_steps for t in self._buffer)

    def add_episode(
        self,
        *,
        obs: Any,
        actions: Any,
        rewards: Any,
        seed: int,
        dones: Any = None,
    ) -> None:
        """Append one episode from its arrays (``dones`` defaults to True at the last step only)."""
        n = len(actions)
        if dones is None:
            dones = torch.zeros(n, dtype=torch.bool)
            dones[-1:] = True
        self.add(
            Trajectories(
                env=self.env,
                obs=torch.as_tensor(np.asarray(obs)),
                actions=actions,
                rewards=torch.as_tensor(np.asarray(rewards, dtype=np.float32)),
                dones=dones,
                episode_starts=torch.tensor([0, n]),
                seeds=torch.tensor([seed]),
                source=self.source,
            )
        )

    def flush(self) -> None:
        """Write the buffered episodes as one shard, then the manifest listing it."""
        if not self._buffer:
            if not (self.path / runs.MANIFEST).is_file():
                self._write_manifest(complete=False)
            return
        data = Trajectories.concat(self._buffer)
        name = runs.shard_name(len(self._shards))
        save_tensors(
            self.path / name, {k: getattr(data, k) for k in _FIELDS}, metadata={"env": self.env, "kind": KIND}
        )
        self._shards.append(_Shard(name, data.n_episodes, data.n_steps, (self.path / name).stat().st_size))
        self._buffer, self._buffered_steps = [], 0
        self._write_manifest(complete=False)

    def close(self) -> Trajectories:
        """Write what is buffered, mark the collection complete, and return the whole data set."""
        self.flush()
        self._write_manifest(complete=True)
        return load_trajectories(self.path)

    def _write_manifest(self, *, complete: bool) -> None:
        _write_manifest(
            self.path / runs.MANIFEST,
            {
                "env": self.env,
                "source": self.source,
                "settings": _jsonable(self.settings),
                "obs_shape": list(env_spec(self.env).obs_shape),
                "complete": complete,
                "n_episodes": self.episodes_written,
                "n_steps": sum(s.steps for s in self._shards),
                "shards": [s.__dict__ for s in self._shards],
            },
        )

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        # whole episodes are never lost: on an error (Ctrl-C ...) the buffered ones are written, unfinished
        self.flush() if exc_type is not None else self.close()


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings), default=str))
