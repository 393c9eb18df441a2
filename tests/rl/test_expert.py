"""The scripted expert: its nominal success rates, what noise and the skill mix do, that recorded episodes
replay exactly in a fresh env, and resumable collection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interplab.rl.envs import env_spec, make_env
from interplab.rl.expert import (
    LEFT,
    collect,
    expert_action,
    instruction_in_view,
    instruction_position,
    play_episode,
)
from interplab.rl.trajectories import Trajectories, load_trajectories

pytest.importorskip("minigrid")

MEMORY = "MiniGrid-MemoryS7-v0"
NAVIGATION = ["MiniGrid-DoorKey-5x5-v0", "MiniGrid-Empty-5x5-v0", "MiniGrid-Empty-Random-5x5-v0"]


def _success_reward(length: int, env: str) -> float:
    return 1 - 0.9 * length / env_spec(env).max_steps


@pytest.mark.parametrize("name", [MEMORY, *NAVIGATION])
def test_the_noiseless_expert_solves_every_seed(tmp_path, name):
    """Its nominal rate: 100% over 50 seeds, each paid minigrid's reward for its episode length."""
    data = collect(name, 50, tmp_path / "d")
    assert data.n_episodes == 50
    torch.testing.assert_close(data.seeds, torch.arange(50))
    expected = torch.tensor([_success_reward(int(n), name) for n in data.lengths])
    torch.testing.assert_close(data.returns, expected)
    assert data.summary().success_rate == 1.0
    assert int(data.lengths.max()) <= (9 if name == MEMORY else 16)  # shortest paths, not wanderings


def test_the_memory_expert_looks_at_the_instruction_before_leaving_the_start_room(tmp_path):
    data = collect(MEMORY, 40, tmp_path / "d")
    env = make_env(MEMORY)
    for e in range(data.n_episodes):
        ep = data.episode(e)
        env.reset(seed=int(ep.seeds[0]))
        seen_at = None
        for t, action in enumerate(ep.actions.tolist()):
            if seen_at is None and instruction_in_view(env, ep.obs[t].numpy()):
                seen_at = t
            assert seen_at is not None or env.unwrapped.agent_pos[0] < 5, f"episode {e} left unseen"
            env.step(action)
        assert seen_at is not None
        # the instruction object drawn in the view is the start room's object
        u = env.unwrapped
        assert u.grid.get(*instruction_position(env)).type in ("key", "ball")


def test_from_anywhere_in_the_start_room_turning_left_shows_the_instruction():
    """The rule the expert looks by: from every cell of the start room (and its doorway), facing any way, at
    most three left turns bring the instruction object into view."""
    env = make_env(MEMORY, seed=0)
    env.reset()
    u = env.unwrapped
    mid = u.height // 2
    cells = [(x, y) for x in range(1, 5) for y in range(mid - 1, mid + 2) if u.grid.get(x, y) is None]
    assert (4, mid) in cells and len(cells) == 9
    for x, y in cells:
        for d in range(4):
            u.agent_pos, u.agent_dir = np.array((x, y)), d
            turns = 0
            while not instruction_in_view(env, u.gen_obs()["image"]):
                assert expert_action(env, seen_instruction=False) == LEFT
                u.agent_dir = (u.agent_dir - 1) % 4
                turns += 1
                assert turns <= 3, (x, y, d)


def test_noise_lowers_success_and_return(tmp_path):
    clean = collect(MEMORY, 50, tmp_path / "clean")
    noisy = collect(MEMORY, 50, tmp_path / "noisy", epsilon=0.5)
    random = collect(MEMORY, 25, tmp_path / "random", epsilon=1.0)
    assert float(noisy.returns.mean()) < float(clean.returns.mean()) - 0.02
    assert float(noisy.lengths.double().mean()) > float(clean.lengths.double().mean()) + 2
    assert random.summary().success_rate < 0.5  # a uniform random policy (about 25%)
    door_clean = collect(NAVIGATION[0], 12, tmp_path / "door_clean")
    door_noisy = collect(NAVIGATION[0], 12, tmp_path / "door_noisy", epsilon=1.0)
    assert door_noisy.summary().success_rate < 0.5 < door_clean.summary().success_rate


def test_wrong_object_fails_and_the_skill_mix_varies_returns(tmp_path):
    env = make_env(MEMORY)
    for seed in range(10):
        ep = play_episode(MEMORY, seed, np.random.default_rng(0), epsilon=0.0, wrong=True, env=env)
        assert (
            float(ep.returns[0]) == 0.0 and ep.n_steps < env_spec(MEMORY).max_steps
        )  # ended at the wrong one
        assert tuple(env.unwrapped.agent_pos) == tuple(env.unwrapped.failure_pos)
    data = collect(MEMORY, 200, tmp_path / "mix", skill_mix=(0.0, 0.1, 0.25, 0.5), wrong_object=0.3)
    rate = data.summary().success_rate
    assert 0.55 < rate < 0.85  # ~0.7 expected: binomial sd over 200 episodes is 0.03
    assert data.summary().return_range[0] == 0.0 and data.summary().return_range[1] > 0.95
    assert len(set(data.lengths.tolist())) > 4  # epsilon differs between episodes
    assert data.source == "expert(eps in [0.0, 0.1, 0.25, 0.5], wrong=0.3)"


def _replay(data: Trajectories) -> None:
    """Each recorded episode, replayed from its seed in a fresh env, gives the same observations, rewards and
    end."""
    for e in range(data.n_episodes):
        ep = data.episode(e)
        env = make_env(data.env)
        obs, _ = env.reset(seed=int(ep.seeds[0]))
        for t, action in enumerate(ep.actions.tolist()):
            np.testing.assert_array_equal(ep.obs[t].numpy(), obs)
            obs, reward, term, trunc, _ = env.step(action)
            assert float(ep.rewards[t]) == pytest.approx(float(reward), abs=1e-7)
            assert bool(ep.dones[t]) == (term or trunc)


@pytest.mark.parametrize("name", [MEMORY, NAVIGATION[0]])
def test_recorded_episodes_replay_exactly(tmp_path, name):
    data = collect(
        name, 15, tmp_path / "d", skill_mix=(0.2, 0.6), wrong_object=0.3 if name == MEMORY else 0.0, seed=3
    )
    torch.testing.assert_close(data.seeds, torch.arange(3, 18))
    _replay(data)


def test_collection_resumes_to_the_same_data(tmp_path):
    kwargs = dict(skill_mix=(0.0, 0.5), wrong_object=0.2, seed=1, shard_steps=20)
    straight = collect(MEMORY, 24, tmp_path / "straight", **kwargs)

    def interrupt(done: int, total: int | None) -> None:
        if done == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(MEMORY, 24, tmp_path / "resumed", progress=interrupt, **kwargs)
    assert load_trajectories(tmp_path / "resumed", allow_partial=True).n_episodes == 13
    seen: list[int] = []
    resumed = collect(MEMORY, 24, tmp_path / "resumed", progress=lambda d, n: seen.append(d), **kwargs)
    assert seen == list(range(14, 25))
    for name in ("obs", "actions", "rewards", "dones", "episode_starts", "seeds"):
        torch.testing.assert_close(getattr(resumed, name), getattr(straight, name), rtol=0, atol=0)
    # asking again returns the finished data set; asking for more extends it
    again = collect(MEMORY, 24, tmp_path / "resumed", **kwargs)
    assert again.n_episodes == 24
    more = collect(MEMORY, 30, tmp_path / "resumed", **kwargs)
    torch.testing.assert_close(more.select(range(24)).actions, straight.actions)
    assert more.n_episodes == 30
    with pytest.raises(ValueError, match="other settings"):
        collect(MEMORY, 30, tmp_path / "resumed", epsilon=0.1)


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown environment 'Nope-v0'"):
        collect("Nope-v0", 1, tmp_path / "a")
    with pytest.raises(ValueError, match="wrong_object is for the memory task"):
        collect(NAVIGATION[1], 1, tmp_path / "a", wrong_object=0.5)
    with pytest.raises(ValueError, match="either epsilon or a non-empty skill_mix"):
        collect(MEMORY, 1, tmp_path / "a", epsilon=0.1, skill_mix=(0.2,))
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\], got 1.5"):
        collect(MEMORY, 1, tmp_path / "a", skill_mix=(0.0, 1.5))
    with pytest.raises(ValueError, match="n_episodes must be >= 0"):
        collect(MEMORY, -1, tmp_path / "a")
    env = make_env(NAVIGATION[1], seed=0)
    env.reset()
    with pytest.raises(ValueError, match="wrong=True is for the memory task"):
        expert_action(env, wrong=True)


def test_instruction_in_view_agrees_with_minigrids_agent_sees():
    env = make_env(MEMORY)
    agree = seen = 0
    for seed in range(5):
        env.reset(seed=seed)
        u = env.unwrapped
        for x in range(1, u.width - 1):
            for y in range(1, u.height - 1):
                if u.grid.get(x, y) is not None:
                    continue
                for d in range(4):
                    u.agent_pos, u.agent_dir = np.array((x, y)), d
                    ours = instruction_in_view(env, u.gen_obs()["image"])
                    assert ours == u.agent_sees(*instruction_position(env)), (seed, x, y, d)
                    agree += 1
                    seen += ours
    assert agree > 100 and 0 < seen < agree
