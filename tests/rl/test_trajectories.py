"""Trajectory data sets: derived arrays against loops, exact save/load round trips, resumable sharded writing,
and the errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from interplab import runs
from interplab.rl.trajectories import (
    KIND,
    VERSION,
    Trajectories,
    TrajectorySummary,
    TrajectoryWriter,
    load_trajectories,
)
from interplab.runs import shard_name

ENV = "MiniGrid-MemoryS7-v0"


def _random(n_episodes: int = 7, seed: int = 0, env: str = ENV, source: str = "random") -> Trajectories:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n_episodes,), generator=g)
    n = int(lengths.sum())
    rewards = torch.zeros(n)
    ends = lengths.cumsum(0) - 1
    rewards[ends] = torch.rand(n_episodes, generator=g).round(decimals=3) * (
        torch.rand(n_episodes, generator=g) > 0.3
    )
    rewards[torch.randint(0, n, (3,), generator=g)] += 0.25  # some rewards before the end too
    dones = torch.zeros(n, dtype=torch.bool)
    dones[ends] = True
    return Trajectories(
        env=env,
        obs=torch.randint(0, 11, (n, 7, 7, 3), generator=g, dtype=torch.uint8),
        actions=torch.randint(0, 7, (n,), generator=g),
        rewards=rewards,
        dones=dones,
        episode_starts=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        seeds=torch.arange(n_episodes) + 100 * seed,
        source=source,
    )


def _assert_same(a: Trajectories, b: Trajectories) -> None:
    assert (a.env, a.source) == (b.env, b.source)
    for name in ("obs", "actions", "rewards", "dones", "episode_starts", "seeds"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_derived_arrays_equal_a_loop_over_episodes():
    t = _random(9)
    returns, lengths, rtg, timesteps = [], [], [], []
    for e in range(t.n_episodes):
        lo, hi = int(t.episode_starts[e]), int(t.episode_starts[e + 1])
        r = t.rewards[lo:hi].tolist()
        returns.append(sum(r))
        lengths.append(hi - lo)
        rtg += [sum(r[i:]) for i in range(len(r))]
        timesteps += list(range(hi - lo))
    torch.testing.assert_close(t.returns, torch.tensor(returns))
    torch.testing.assert_close(t.lengths, torch.tensor(lengths))
    torch.testing.assert_close(t.rtg, torch.tensor(rtg))
    torch.testing.assert_close(t.timesteps, torch.tensor(timesteps))
    torch.testing.assert_close(
        t.episode_index, torch.repeat_interleave(torch.arange(9), torch.tensor(lengths))
    )
    assert t.returns.dtype == t.rtg.dtype == torch.float32
    assert (t.n_episodes, t.n_steps) == (9, sum(lengths))


def test_episode_select_and_concat():
    t = _random(6)
    e2 = t.episode(2)
    lo, hi = int(t.episode_starts[2]), int(t.episode_starts[3])
    torch.testing.assert_close(e2.obs, t.obs[lo:hi])
    torch.testing.assert_close(e2.episode_starts, torch.tensor([0, hi - lo]))
    torch.testing.assert_close(e2.seeds, t.seeds[2:3])
    _assert_same(t.episode(-1), t.episode(5))
    _assert_same(Trajectories.concat([t.episode(e) for e in range(6)]), t)
    picked = t.select([4, 1])
    _assert_same(picked, Trajectories.concat([t.episode(4), t.episode(1)]))
    torch.testing.assert_close(picked.returns, t.returns[[4, 1]])
    with pytest.raises(IndexError, match="episode 6 out of range: the data has 6 episodes"):
        t.episode(6)
    with pytest.raises(
        ValueError, match="different environments: MiniGrid-Empty-5x5-v0, MiniGrid-MemoryS7-v0"
    ):
        Trajectories.concat([t, _random(2, env="MiniGrid-Empty-5x5-v0")])
    both = Trajectories.concat([t, _random(2, seed=1, source="other")])
    assert both.source == "random + other" and both.n_episodes == 8


def test_save_load_round_trip_is_exact_over_shards(tmp_path):
    t = _random(20)
    t.save(tmp_path / "d", shard_steps=10)
    manifest = json.loads((tmp_path / "d" / runs.MANIFEST).read_text())
    assert manifest["kind"] == KIND and manifest["version"] == VERSION and manifest["complete"] is True
    assert manifest["env"] == ENV and manifest["n_episodes"] == 20 and manifest["n_steps"] == t.n_steps
    assert len(manifest["shards"]) > 2
    assert sum(s["episodes"] for s in manifest["shards"]) == 20
    _assert_same(load_trajectories(tmp_path / "d"), t)
    # saving again replaces the data set whole (fewer shards now: none of the old ones is left over)
    small = _random(3, seed=2)
    small.save(tmp_path / "d")
    _assert_same(load_trajectories(tmp_path / "d"), small)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [runs.MANIFEST, shard_name(0)]
    assert not [p for p in tmp_path.iterdir() if p.name != "d"]  # no temporary folders left behind


def test_writer_resumes_after_the_last_complete_shard(tmp_path):
    """A collection killed mid-way (buffer lost, a shard written but not yet listed) resumes from the last
    listed shard and ends with the same data as one run straight through."""
    t = _random(12)
    episodes = [t.episode(e) for e in range(12)]
    out = tmp_path / "c"
    settings = {"epsilon": 0.1, "skill_mix": [0.0, 0.5]}
    w = TrajectoryWriter(out, ENV, source="random", settings=settings, shard_steps=12)
    for ep in episodes[:7]:
        w.add(ep)
    written = w.episodes_written
    assert 0 < written < 7 and w.n_episodes == 7 and w.n_shards >= 1
    # killed: the buffered episodes are lost; a shard that was written after the manifest is not listed
    (out / shard_name(w.n_shards)).write_bytes(b"torn")
    with pytest.raises(ValueError, match="unfinished collection"):
        load_trajectories(out)
    partial = load_trajectories(out, allow_partial=True)
    assert partial.n_episodes == written
    w2 = TrajectoryWriter(out, ENV, source="random", settings=settings, shard_steps=12)
    assert w2.episodes_written == written and w2.n_shards == w.n_shards
    for ep in episodes[written:]:
        w2.add(ep)
    _assert_same(w2.close(), t)
    _assert_same(load_trajectories(out), t)
    # the same collection with other settings, or of another env, is refused
    with pytest.raises(ValueError, match=r"other settings \(epsilon: 0.1 there, 0.3 now\); use a new folder"):
        TrajectoryWriter(out, ENV, source="random", settings={**settings, "epsilon": 0.3})
    with pytest.raises(
        ValueError, match="holds trajectories of MiniGrid-MemoryS7-v0; cannot add MiniGrid-Empty"
    ):
        TrajectoryWriter(out, "MiniGrid-Empty-5x5-v0", source="random", settings=settings)


def test_writer_context_keeps_whole_episodes_on_an_error(tmp_path):
    t = _random(4)
    with pytest.raises(KeyboardInterrupt), TrajectoryWriter(tmp_path / "w", ENV, source="random") as w:
        w.add(t.select([0, 1]))
        raise KeyboardInterrupt
    kept = load_trajectories(tmp_path / "w", allow_partial=True)
    _assert_same(kept, t.select([0, 1]))
    with TrajectoryWriter(tmp_path / "w", ENV, source="random") as w:
        w.add(t.select([2, 3]))
    _assert_same(load_trajectories(tmp_path / "w"), t)


def test_add_episode_builds_the_arrays(tmp_path):
    w = TrajectoryWriter(tmp_path / "e", ENV, source="hand")
    obs = torch.zeros(3, 7, 7, 3, dtype=torch.uint8)
    w.add_episode(obs=obs.numpy(), actions=[2, 1, 2], rewards=[0.0, 0.0, 0.5], seed=7)
    t = w.close()
    torch.testing.assert_close(t.dones, torch.tensor([False, False, True]))
    torch.testing.assert_close(t.seeds, torch.tensor([7]))
    torch.testing.assert_close(t.rtg, torch.tensor([0.5, 0.5, 0.5]))


def test_bad_arrays_are_refused_naming_the_problem():
    t = _random(2)
    fields = dict(
        env=ENV, obs=t.obs, actions=t.actions, rewards=t.rewards, dones=t.dones,
        episode_starts=t.episode_starts, seeds=t.seeds,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"mismatched observation shapes: obs is \[\d+, 5, 5, 3\], but "):
        Trajectories(**{**fields, "obs": t.obs[:, :5, :5]})
    with pytest.raises(ValueError, match="obs must be uint8"):
        Trajectories(**{**fields, "obs": t.obs.float()})
    with pytest.raises(ValueError, match="unknown environment 'CartPole-v1'; supported"):
        Trajectories(**{**fields, "env": "CartPole-v1"})
    with pytest.raises(ValueError, match=r"actions must be \[\d+\]"):
        Trajectories(**{**fields, "actions": t.actions[:-1]})
    with pytest.raises(ValueError, match="action 7 outside MiniGrid-MemoryS7-v0's 0..6"):
        Trajectories(**{**fields, "actions": torch.full_like(t.actions, 7)})
    with pytest.raises(ValueError, match="episode_starts must run from 0 to the number of steps"):
        Trajectories(**{**fields, "episode_starts": t.episode_starts[:-1]})
    with pytest.raises(ValueError, match="episode 1 is empty"):
        Trajectories(**{**fields, "episode_starts": torch.tensor([0, 1, 1, t.n_steps]), "seeds": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"seeds must be \[2\]"):
        Trajectories(**{**fields, "seeds": t.seeds[:1]})
    with pytest.raises(ValueError, match="dones must be bool"):
        Trajectories(**{**fields, "dones": t.dones.long()})
    inner = t.dones.clone()
    inner[0] = True
    if int(t.episode_starts[1]) > 1:
        with pytest.raises(ValueError, match="step 0 is done but is not the last step of its episode"):
            Trajectories(**{**fields, "dones": inner})


def test_folders_of_another_kind_or_env_are_clear_errors(tmp_path):
    _random(3).save(tmp_path / "memory")
    with pytest.raises(
        ValueError, match="holds trajectories of MiniGrid-MemoryS7-v0, not of MiniGrid-Empty-5x5"
    ):
        load_trajectories(tmp_path / "memory", env="MiniGrid-Empty-5x5-v0")
    assert load_trajectories(tmp_path / "memory", env=ENV).n_episodes == 3
    cache = tmp_path / "cache"
    cache.mkdir()
    runs.write_json(cache / runs.MANIFEST, runs.Kind.ACTIVATION_CACHE, {"hooks": [], "shards": []})
    with pytest.raises(runs.RunError, match="is an activation cache; expected a trajectory data set"):
        load_trajectories(cache)
    with pytest.raises(runs.RunError, match="is an activation cache; expected a trajectory data set"):
        TrajectoryWriter(cache, ENV)
    with pytest.raises(runs.RunError, match="is an activation cache"):
        _random(1).save(cache)
    train = tmp_path / "train"
    train.mkdir()
    runs.write_json(train / runs.CONFIG, runs.Kind.TRAIN, {"model": {}})
    with pytest.raises(runs.RunError, match="is a training run .*; expected a trajectory data set"):
        load_trajectories(train)
    (tmp_path / "empty").mkdir()
    with pytest.raises(runs.RunError, match="is an empty folder; expected a trajectory data set"):
        load_trajectories(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no trajectory data set at"):
        load_trajectories(tmp_path / "nothing")


def test_damaged_or_newer_folders_are_refused(tmp_path):
    _random(3).save(tmp_path / "d")
    shard = tmp_path / "d" / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="bytes but the manifest says .* \\(damaged\\?\\)"):
        load_trajectories(tmp_path / "d")
    shard.unlink()
    with pytest.raises(
        FileNotFoundError, match="shard shard_00000.safetensors listed in the manifest is missing"
    ):
        load_trajectories(tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / runs.MANIFEST).read_text())
    (tmp_path / "d" / runs.MANIFEST).write_text(json.dumps({**manifest, "version": VERSION + 1}))
    with pytest.raises(runs.RunError, match="written by a newer interplab"):
        load_trajectories(tmp_path / "d")


def test_summary_numbers_repr_and_plot(tmp_path):
    t = _random(10)
    s = t.summary()
    assert isinstance(s, TrajectorySummary)
    torch.testing.assert_close(s.returns, t.returns)
    torch.testing.assert_close(s.lengths, t.lengths)
    assert s.success_rate == pytest.approx(float((t.returns > 0).float().mean()))
    assert s.return_range == (float(t.returns.min()), float(t.returns.max()))
    d = s.to_dict()
    assert d["return_mean"] == pytest.approx(float(t.returns.double().mean()))
    assert d["length_range"] == [int(t.lengths.min()), int(t.lengths.max())] and d["n_steps"] == t.n_steps
    text = repr(s)
    assert text.startswith(f"TrajectorySummary({ENV}, random: 10 episodes, {t.n_steps} steps; return ")
    assert len(text) < 200 and "\n" not in text
    fig = s.plot()
    assert [tr.type for tr in fig.data] == ["histogram", "histogram"]
    assert list(fig.data[0].x) == pytest.approx(t.returns.tolist())
    assert list(fig.data[1].x) == t.lengths.tolist()
    s.save(tmp_path / "summary.html")
    assert (tmp_path / "summary.html").is_file() and (tmp_path / runs.PLOTLY_JS).is_file()
    s.save(tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text())["type"] == "TrajectorySummary"
    assert repr(t) == f"Trajectories({ENV}, 10 episodes, {t.n_steps} steps, source='random')"
