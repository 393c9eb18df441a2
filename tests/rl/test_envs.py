"""The MiniGrid wrappers: observations and rewards equal minigrid's own for fixed seeds; specs; bad names."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

from interplab.rl.envs import (
    SUPPORTED_ENVS,
    EnvSpec,
    env_spec,
    fast_gen_obs,
    install_fast_obs,
    make_env,
    make_vector_env,
    render_obs,
)

gymnasium = pytest.importorskip("gymnasium")
pytest.importorskip("minigrid")

NAMES = list(SUPPORTED_ENVS)


def _actions(seed: int, n: int) -> list[int]:
    return [int(a) for a in np.random.default_rng(seed).integers(0, 7, size=n)]


def test_envs_module_imports_without_minigrid():
    code = (
        "import sys; sys.modules['minigrid'] = None; sys.modules['gymnasium'] = None\n"
        "import interplab.rl.envs as e, interplab.rl as rl\n"
        "assert rl.env_spec('MiniGrid-MemoryS7-v0').max_steps == 245\n"
        "try:\n    e.make_env('MiniGrid-MemoryS7-v0')\nexcept ImportError as err:\n"
        "    assert 'interplab[rl]' in str(err), err\nelse:\n    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", NAMES)
def test_observations_and_rewards_equal_minigrids_own(name):
    """Same seed, same actions: our env's observations, rewards, terminations equal minigrid's own env's."""
    for seed in range(3):
        ours = make_env(name, seed=seed)
        theirs = gymnasium.make(name)
        obs, _ = ours.reset()
        ref, _ = theirs.reset(seed=seed)
        assert obs.dtype == np.uint8 and obs.shape == (7, 7, 3)
        np.testing.assert_array_equal(obs, ref["image"])
        for action in _actions(seed, 300):
            obs, reward, term, trunc, _ = ours.step(action)
            ref_obs, ref_reward, ref_term, ref_trunc, _ = theirs.step(action)
            np.testing.assert_array_equal(obs, ref_obs["image"])
            assert (reward, term, trunc) == (ref_reward, ref_term, ref_trunc)
            if term or trunc:
                obs, _ = ours.reset(seed=seed + 100)
                ref, _ = theirs.reset(seed=seed + 100)
                np.testing.assert_array_equal(obs, ref["image"])


def _random_objects(rng: np.random.Generator) -> list:
    from minigrid.core.world_object import Ball, Box, Door, Goal, Key, Lava, Wall

    colors = ["red", "green", "blue", "purple", "yellow", "grey"]
    c = str(rng.choice(colors))
    return [
        None,
        Wall(),
        Key(c),
        Ball(c),
        Box(c),
        Goal(),
        Lava(),
        Door(c, is_open=True),
        Door(c),
        Door(c, is_locked=True),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_fast_obs_equals_minigrids_gen_obs_on_random_states(name):
    """`fast_gen_obs` equals MiniGrid's ``gen_obs`` on thousands of random states: random layouts (seeds),
    random objects of every kind placed anywhere (open, closed, locked doors occlude or not), the agent at any
    cell (walls and the border included: the view then leaves the grid) facing any way, carrying something or
    not, with and without ``see_through_walls``, and along random play."""
    from minigrid.minigrid_env import MiniGridEnv

    rng = np.random.default_rng(0)
    env = make_env(name)
    u = env.unwrapped
    assert "gen_obs" in vars(u)  # installed: env.step returns fast_gen_obs
    checked = 0
    for seed in range(25):
        env.reset(seed=seed)
        for _ in range(int(rng.integers(0, 12))):  # objects anywhere
            x, y = int(rng.integers(0, u.grid.width)), int(rng.integers(0, u.grid.height))
            objects = _random_objects(rng)
            u.grid.set(x, y, objects[int(rng.integers(0, len(objects)))])
        for _ in range(40):
            u.agent_pos = (int(rng.integers(0, u.grid.width)), int(rng.integers(0, u.grid.height)))
            u.agent_dir = int(rng.integers(0, 4))
            u.carrying = _random_objects(rng)[int(rng.integers(0, 4))]
            u.see_through_walls = bool(rng.random() < 0.2)
            ref, ours = MiniGridEnv.gen_obs(u), fast_gen_obs(u)
            np.testing.assert_array_equal(ours["image"], ref["image"])
            assert ours["image"].dtype == np.uint8
            assert (ours["direction"], ours["mission"]) == (ref["direction"], ref["mission"])
            checked += 1
    for seed in range(10):  # and along play, through env.step (which returns the installed gen_obs)
        obs, _ = env.reset(seed=seed)
        for action in _actions(seed, 100):
            np.testing.assert_array_equal(obs, MiniGridEnv.gen_obs(u)["image"])
            obs, _, term, trunc, _ = env.step(action)
            checked += 1
            if term or trunc:
                break
    assert checked >= 1000


def test_fast_obs_is_installed_only_on_minigrids_own_observation_code():
    from minigrid.core.grid import Grid
    from minigrid.envs.empty import EmptyEnv
    from minigrid.minigrid_env import MiniGridEnv

    env = make_env("MiniGrid-Empty-5x5-v0", seed=0)
    env.reset()
    assert "gen_obs" in vars(env.unwrapped)  # the instance's own, not MiniGrid's method
    twin = copy.deepcopy(env.unwrapped)  # a copy's observation is its own state's
    twin.agent_dir = (env.unwrapped.agent_dir + 1) % 4
    np.testing.assert_array_equal(twin.gen_obs()["image"], MiniGridEnv.gen_obs(twin)["image"])

    class OwnObs(EmptyEnv):
        def gen_obs(self):
            return {"image": np.zeros((7, 7, 3), np.uint8), "direction": 0, "mission": ""}

    assert not install_fast_obs(OwnObs(size=5))
    assert not install_fast_obs(object())

    class OtherGrid(Grid):
        pass

    u = EmptyEnv(size=5)
    assert install_fast_obs(u)
    u.reset(seed=0)
    calls = []
    original = MiniGridEnv.gen_obs

    def spy(self):
        calls.append(1)
        return original(self)

    MiniGridEnv.gen_obs = spy  # type: ignore[method-assign]
    try:
        u.gen_obs()
        assert not calls  # a plain Grid: the fast path
        grid = OtherGrid(u.grid.width, u.grid.height)
        grid.grid = list(u.grid.grid)
        u.grid = grid
        u.gen_obs()
        assert calls  # another grid class: MiniGrid's own
    finally:
        MiniGridEnv.gen_obs = original  # type: ignore[method-assign]


def test_a_reward_is_paid_and_equals_minigrids_formula():
    """Random play in Empty-5x5 reaches the goal sometimes; the reward is 1 - 0.9 * steps / max_steps."""
    name = "MiniGrid-Empty-5x5-v0"
    spec = env_spec(name)
    paid = 0
    for seed in range(20):
        env = make_env(name, seed=seed)
        env.reset()
        for step, action in enumerate(_actions(seed, spec.max_steps), start=1):
            _, reward, term, trunc, _ = env.step(action)
            if term:
                assert reward == pytest.approx(1 - 0.9 * step / spec.max_steps, abs=1e-12)
                paid += 1
            if term or trunc:
                break
    assert paid > 0


def test_seed_at_make_seeds_the_first_reset_only():
    name = "MiniGrid-MemoryS7-v0"
    a, _ = make_env(name, seed=5).reset()
    b, _ = make_env(name).reset(seed=5)
    np.testing.assert_array_equal(a, b)
    env = make_env(name, seed=5)
    env.reset()
    env.reset(seed=7)  # an explicit seed wins, and the construction seed is used up
    c, _ = make_env(name).reset(seed=7)
    np.testing.assert_array_equal(env.unwrapped.gen_obs()["image"], c)


@pytest.mark.parametrize("name", NAMES)
def test_specs_match_the_environments(name):
    spec = env_spec(name)
    env = make_env(name, seed=0)
    obs, _ = env.reset()
    assert spec.name == name
    assert spec.max_steps == env.unwrapped.max_steps
    assert spec.n_actions == env.action_space.n
    assert spec.obs_shape == obs.shape == env.observation_space.shape
    assert spec.max_return == 1.0 and spec.description


def test_unknown_env_lists_the_supported_ones():
    with pytest.raises(
        ValueError, match="unknown environment 'MiniGrid-Nope-v0'; supported: MiniGrid-MemoryS7-v0"
    ):
        env_spec("MiniGrid-Nope-v0")
    with pytest.raises(ValueError, match="supported: .*MiniGrid-DoorKey-5x5-v0"):
        make_env("CartPole-v1")
    with pytest.raises(ValueError, match="unknown environment"):
        make_vector_env("CartPole-v1", 2)
    with pytest.raises(ValueError, match="max_steps must be > 0"):
        EnvSpec(name="x", max_steps=0)


def test_vector_env_seeds_env_i_with_seed_plus_i():
    name = "MiniGrid-MemoryS7-v0"
    venv = make_vector_env(name, 3, seed=10)
    obs, _ = venv.reset()
    assert obs.shape == (3, 7, 7, 3) and obs.dtype == np.uint8
    actions = _actions(0, 12)
    singles = [make_env(name, seed=10 + i) for i in range(3)]
    refs = [env.reset()[0] for env in singles]
    np.testing.assert_array_equal(obs, np.stack(refs))
    for action in actions:  # all three step in lockstep until one ends (NextStep autoreset follows then)
        obs, rewards, terms, truncs, _ = venv.step(np.full(3, action))
        outs = [env.step(action) for env in singles]
        np.testing.assert_array_equal(obs, np.stack([o[0] for o in outs]))
        np.testing.assert_array_equal(rewards, [o[1] for o in outs])
        if terms.any() or truncs.any():
            break
    again, _ = make_vector_env(name, 3, seed=10).reset(seed=10)
    np.testing.assert_array_equal(again, np.stack(refs))
    with pytest.raises(ValueError, match="n >= 1"):
        make_vector_env(name, 0)
    with pytest.raises(ValueError, match="autoreset_mode 'Sometimes'; valid: NextStep, SameStep, Disabled"):
        make_vector_env(name, 2, autoreset_mode="Sometimes")


def test_render_obs_draws_minigrids_agent_view():
    from minigrid.core.grid import Grid

    env = make_env("MiniGrid-MemoryS7-v0", seed=1)
    obs, _ = env.reset()
    picture = render_obs(obs, tile_size=8)
    assert picture.shape == (56, 56, 3) and picture.dtype == np.uint8
    # minigrid's own rendering of the agent's view (what env.render shows in the corner, agent_pov=True)
    grid, vis = Grid.decode(obs)
    np.testing.assert_array_equal(picture, grid.render(8, agent_pos=(3, 6), agent_dir=3, highlight_mask=vis))
    # minigrid's pov render draws the same picture, except that it also draws objects hidden behind walls
    pov = env.unwrapped.get_pov_render(tile_size=8)
    seen = np.repeat(np.repeat(vis.T, 8, axis=0), 8, axis=1)
    np.testing.assert_array_equal(picture[seen], pov[seen])
    assert picture[~seen].max() <= 100  # unseen cells: black but for the grey grid lines
    assert not vis.all()
    import torch

    np.testing.assert_array_equal(render_obs(torch.as_tensor(obs)), picture)
    with pytest.raises(ValueError, match=r"one view of shape \(7, 7, 3\), got \(2, 7, 7, 3\)"):
        render_obs(np.zeros((2, 7, 7, 3), np.uint8))
