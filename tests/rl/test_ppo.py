"""`interplab.rl.ppo`: GAE and the clipped loss against hand computations, a PPO agent that learns Empty-5x5
in CI time, bit-exact resume after a stop or a kill, trajectories collected from its checkpoints that replay
in the environment, the run folder's kind, the CLI, and bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from interplab import runs
from interplab.runs import Kind, RunError

minigrid = pytest.importorskip("minigrid")

from interplab.cli.main import app  # noqa: E402
from interplab.rl.envs import make_env, make_vector_env  # noqa: E402
from interplab.rl.ppo import (  # noqa: E402
    ActorCritic,
    Memory,
    PPOConfig,
    collect_ppo,
    gae,
    load_ppo_policy,
    play_ppo,
    ppo_config,
    ppo_loss,
    ppo_preset,
    train_ppo,
)
from interplab.rl.trajectories import load_trajectories  # noqa: E402

EMPTY = "MiniGrid-Empty-5x5-v0"
runner = CliRunner()
TINY = {"n_envs": 4, "rollout": 32, "epochs": 2, "minibatches": 2, "hidden": 16, "channels": 8}
"""a GRU policy small enough to train a few updates in a second"""


# ---- the algorithm against hand computations ------------------------------------------------------
def test_gae_equals_a_hand_written_loop():
    g = torch.Generator().manual_seed(0)
    t, b, gamma, lam = 9, 3, 0.9, 0.8
    rewards, values, next_values = (torch.rand(t, b, generator=g) for _ in range(3))
    ends = torch.rand(t, b, generator=g) < 0.3
    terminated = ends & (torch.rand(t, b, generator=g) < 0.5)  # some ends are time-limit truncations
    adv, ret = gae(rewards, values, next_values, terminated, ends, gamma=gamma, lam=lam)
    want = torch.zeros(t, b)
    for j in range(b):
        following = 0.0  # the advantage of step i + 1 of the same episode
        for i in reversed(range(t)):
            bootstrap = 0.0 if terminated[i, j] else float(next_values[i, j])
            delta = float(rewards[i, j]) + gamma * bootstrap - float(values[i, j])
            if ends[i, j]:
                following = 0.0
            following = delta + gamma * lam * following
            want[i, j] = following
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, want + values)


def test_clipped_loss_equals_a_hand_computation():
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    actions = torch.tensor([1, 0, 2])
    old_logp = torch.tensor([-1.0, -0.2, -1.5])
    adv = torch.tensor([1.0, -2.0, 0.5])
    values, returns = torch.tensor([0.1, 0.5, -0.2]), torch.tensor([0.3, 0.0, 0.4])
    clip, vc, ec = 0.2, 0.5, 0.01
    loss = ppo_loss(
        logits, actions, old_logp, adv, values, returns, clip=clip, value_coef=vc, entropy_coef=ec
    )

    def logp(row: list[float], a: int) -> float:
        return row[a] - math.log(sum(math.exp(x) for x in row))

    rows = logits.tolist()
    ratios = [math.exp(logp(rows[i], int(actions[i])) - float(old_logp[i])) for i in range(3)]
    surrogate = [
        max(-float(adv[i]) * r, -float(adv[i]) * min(max(r, 1 - clip), 1 + clip))
        for i, r in enumerate(ratios)
    ]
    policy = sum(surrogate) / 3
    value = 0.5 * sum((float(v) - float(r)) ** 2 for v, r in zip(values, returns, strict=True)) / 3
    entropy = -sum(sum(math.exp(logp(row, a)) * logp(row, a) for a in range(3)) for row in rows) / 3
    kl = sum((r - 1) - math.log(r) for r in ratios) / 3
    clipped = sum(abs(r - 1) > clip for r in ratios) / 3
    assert 0 < clipped < 1  # the batch exercises both sides of the clip
    for got, want in (
        (loss.policy, policy),
        (loss.value, value),
        (loss.entropy, entropy),
        (loss.approx_kl, kl),
        (loss.clip_fraction, clipped),
        (loss.total, policy + vc * value - ec * entropy),
    ):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_unroll_equals_step_by_step():
    """The recurrent minibatch path (a sequence unrolled from a state, reset at episode starts) equals the
    step-by-step path the rollout took."""
    torch.manual_seed(0)
    net = ActorCritic(PPOConfig(env=EMPTY, steps=1, **TINY))
    t, b = 6, 3
    obs = torch.randint(0, 3, (t, b, 7, 7, 3), dtype=torch.uint8)
    starts = torch.rand(t, b) < 0.3
    state0 = torch.randn(b, net.hidden_size)
    logits, values = net.unroll(obs, state0, starts)
    state = state0
    for i in range(t):
        lg, v, state = net.step(obs[i], state, starts[i])
        torch.testing.assert_close(logits[i], lg)
        torch.testing.assert_close(values[i], v)


# ---- training -------------------------------------------------------------------------------------
def random_returns(env_name: str, seeds: range) -> torch.Tensor:
    rng = np.random.default_rng(0)
    out = []
    for s in seeds:
        env = make_env(env_name)
        env.reset(seed=s)
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(int(rng.integers(7)))
            total, done = total + float(r), term or trunc
        out.append(total)
    return torch.tensor(out)


@pytest.fixture(scope="module")
def empty_agent(tmp_path_factory):
    """A memoryless agent trained on Empty-5x5 (~10 s of CPU)."""
    run = tmp_path_factory.mktemp("ppo") / "empty"
    cfg = PPOConfig(env=EMPTY, steps=12_288, memory=Memory.NONE, n_envs=8, rollout=128, lr=2e-3, seed=0)
    return train_ppo(cfg, run)


def test_ppo_beats_the_random_policy_on_held_out_seeds(empty_agent):
    held_out = range(64)  # training episodes are seeded from 10^6 on
    random = random_returns(EMPTY, held_out)
    trained = play_ppo(load_ppo_policy(empty_agent.run_dir), len(held_out), seed=0)
    assert trained.seeds.tolist() == list(held_out)
    assert float((trained.returns > 0).float().mean()) >= 0.95
    assert float(trained.returns.mean()) > float(random.mean()) + 0.4
    first = load_ppo_policy(empty_agent.run_dir, 0)  # the untrained policy of checkpoint 0 does not
    assert float(play_ppo(first, len(held_out), seed=0).returns.mean()) < float(trained.returns.mean()) - 0.3


def test_the_run_folder_follows_the_contract(empty_agent):
    run = empty_agent.run_dir
    assert runs.detect(run) is Kind.PPO
    opened = runs.open_run(run)
    assert isinstance(opened, runs.PPORun)
    assert PPOConfig.from_dict(opened.config) == PPOConfig.from_dict(
        json.loads((run / runs.CONFIG).read_text())
    )
    steps = [c.step for c in opened.checkpoints()]
    assert steps[0] == 0 and steps[-1] == 12_288 and steps == sorted(steps)
    assert steps[1] == 1024  # dense early: the first update is kept
    rows = [r for r in opened.log if "update" in r]
    assert [r["step"] for r in rows] == [1024 * (i + 1) for i in range(12)]
    report = opened.report
    assert report is not None and report["kind"] == Kind.PPO_REPORT.value and report["finished"]
    assert runs.Report.open(run).kind is Kind.PPO_REPORT
    again = train_ppo(PPOConfig.from_dict(opened.config), run)  # finished: found, not retrained
    assert again.step == 12_288 and again.resumed_from == 12_288


def test_config_round_trip_and_validation():
    cfg = PPOConfig(env="MiniGrid-MemoryS7-v0", steps=5000, memory="none", gamma=0.9)
    assert cfg.memory is Memory.NONE
    assert PPOConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for kwargs, named in (
        ({"env": "MiniGrid-Nope-v0"}, "supported"),
        ({"memory": "lstm"}, "valid: gru, none"),
        ({"steps": 0}, "steps"),
        ({"gamma": 1.5}, "gamma"),
        ({"n_envs": 6, "minibatches": 4}, "must divide n_envs"),
        ({"clip": 0}, "clip"),
    ):
        with pytest.raises(ValueError, match=named):
            PPOConfig(**{"env": EMPTY, **kwargs})
    with pytest.raises(ValueError, match="unknown PPOConfig fields"):
        PPOConfig.from_dict({**cfg.to_dict(), "lr_schedule": "cosine"})


DOORKEY = "MiniGrid-DoorKey-5x5-v0"


def test_the_doorkey_preset_and_its_overrides():
    """The preset's settings are the ones docs/dt.md measured (changing them invalidates that measurement)."""
    cfg = ppo_preset("doorkey-ppo")
    assert (cfg.env, cfg.memory, cfg.n_envs, cfg.rollout, cfg.minibatches) == (
        DOORKEY,
        Memory.NONE,
        16,
        128,
        8,
    )
    assert (cfg.steps, cfg.batch, cfg.updates, cfg.lr, cfg.entropy_coef) == (65_536, 2048, 32, 1e-3, 0.02)
    assert cfg.anneal_lr is False  # the seed-robust setting (5 of 5 seeds; annealed: 4 of 5)
    assert cfg.batch // cfg.minibatches == 256  # the reference's minibatch size
    assert ppo_preset("doorkey-ppo", steps=4096, seed=3).updates == 2
    assert ppo_config(DOORKEY, preset="doorkey-ppo", steps=None, n_envs=2, memory=None) == cfg.replace(
        n_envs=2
    )
    assert ppo_config(EMPTY, steps=512, memory="none") == PPOConfig(env=EMPTY, steps=512, memory=Memory.NONE)
    with pytest.raises(ValueError, match="unknown PPO preset 'doorkey'; presets: doorkey-ppo"):
        ppo_preset("doorkey")
    with pytest.raises(ValueError, match="is for MiniGrid-DoorKey-5x5-v0, not MiniGrid-Empty-5x5-v0"):
        ppo_config(EMPTY, preset="doorkey-ppo")
    with pytest.raises(ValueError, match="give --steps"):
        ppo_config(EMPTY, memory="gru")


def test_cli_ppo_with_the_doorkey_preset(tmp_path):
    """The preset reaches the run's config.json, flags override it (one short update, not a training run)."""
    run = tmp_path / "dk"
    args = [
        "dt",
        "ppo",
        DOORKEY,
        "--preset",
        "doorkey-ppo",
        "--steps",
        "256",
        "--n-envs",
        "2",
        "--out",
        str(run),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = PPOConfig.from_dict(runs.PPORun.open(run).config)
    assert saved == ppo_preset("doorkey-ppo", steps=256, n_envs=2)
    res = runner.invoke(app, ["dt", "ppo", EMPTY, "--preset", "doorkey-ppo", "--out", str(tmp_path / "e")])
    assert res.exit_code != 0 and "not MiniGrid-Empty-5x5-v0" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["dt", "ppo", EMPTY, "--out", str(tmp_path / "e")])
    assert res.exit_code != 0 and "give --steps" in res.output


def _rows(run):
    return [{k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")} for r in runs.read_log(run)]


def _weights(run, step):
    return load_file(runs.PPORun.open(run).checkpoint(step).path / runs.MODEL_WEIGHTS)


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    """Episodes outlast the rollouts (Empty-5x5 caps at 100 steps, a rollout is 32), so the resumed run must
    put each environment back mid-episode (by replay) and the GRU state back, bit-exactly."""
    cfg = PPOConfig(env=EMPTY, steps=4 * 128, seed=3, **TINY)
    full = train_ppo(cfg, tmp_path / "full")
    part = train_ppo(cfg, tmp_path / "part", stop_after=256)
    assert part.step == 256
    resumed = train_ppo(cfg, tmp_path / "part")
    assert resumed.resumed_from == 256 and resumed.step == full.step == 512
    for a, b in zip(
        _weights(tmp_path / "full", 512).items(), _weights(tmp_path / "part", 512).items(), strict=True
    ):
        assert a[0] == b[0]
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    full_rows = [r for r in _rows(tmp_path / "full") if "update" in r]
    assert full_rows == [r for r in _rows(tmp_path / "part") if "update" in r]
    # a kill after checkpoint 128: later checkpoints gone, the log and report as the killed run left them
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", killed)
    for c in runs.PPORun.open(killed).checkpoints():
        if c.step > 128:
            shutil.rmtree(c.path)
    (killed / runs.REPORT).unlink()
    again = train_ppo(cfg, killed)
    assert again.resumed_from == 128
    torch.testing.assert_close(_weights(killed, 512), _weights(tmp_path / "full", 512), rtol=0, atol=0)
    assert [r for r in _rows(killed) if "update" in r] == full_rows


def test_a_resume_with_another_config_or_into_another_folder_is_refused(tmp_path):
    cfg = PPOConfig(env=EMPTY, steps=128, seed=0, **TINY)
    train_ppo(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="differs in lr"):
        train_ppo(cfg.replace(lr=0.5), tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a PPO run"):
        train_ppo(cfg, tmp_path / "run", resume=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a PPO run"):
        train_ppo(cfg, tmp_path / "other")


# ---- collection -----------------------------------------------------------------------------------
def test_collected_trajectories_load_and_replay_in_the_env(empty_agent, tmp_path):
    run = empty_agent.run_dir
    early, late = 1024, 12_288
    data = collect_ppo(run, EMPTY, 10, tmp_path / "data", checkpoints=[early, late], epsilon=0.1, seed=100)
    loaded = load_trajectories(tmp_path / "data", env=EMPTY)
    assert loaded.n_episodes == 10 and loaded.seeds.tolist() == list(range(100, 110))
    torch.testing.assert_close(loaded.obs, data.obs)
    manifest = runs.TrajectoriesDir.open(tmp_path / "data").manifest
    assert manifest["source"] == f"ppo:{run.name}@{early},{late}(sampled, eps=0.1)"
    assert manifest["settings"]["checkpoints"] == [early, late] and manifest["settings"]["policy"] == "ppo"
    for e in range(loaded.n_episodes):  # every step replays: the same views and rewards from the seed
        ep = loaded.episode(e)
        env = make_env(EMPTY)
        obs, _ = env.reset(seed=int(ep.seeds[0]))
        for i, a in enumerate(ep.actions.tolist()):
            np.testing.assert_array_equal(ep.obs[i].numpy(), obs)
            obs, r, term, trunc, _ = env.step(a)
            assert float(ep.rewards[i]) == pytest.approx(float(r))
            assert bool(ep.dones[i]) == (term or trunc)
    # episode e plays checkpoints[e % 2]: the late checkpoint's (odd) episodes return more than the early's
    returns = loaded.returns
    assert float(returns[1::2].mean()) > float(returns[0::2].mean())
    again = collect_ppo(run, EMPTY, 10, tmp_path / "data", checkpoints=[early, late], epsilon=0.1, seed=100)
    torch.testing.assert_close(again.actions, loaded.actions)  # a finished collection is returned as is


def test_play_batched_equals_one_env_at_a_time_and_greedy_is_deterministic(empty_agent):
    pol = load_ppo_policy(empty_agent.run_dir)
    batched = play_ppo(pol, 6, seed=7, n_envs=4)
    looped = play_ppo(pol, 6, seed=7, n_envs=1)
    torch.testing.assert_close(batched.actions, looped.actions)
    torch.testing.assert_close(batched.episode_starts, looped.episode_starts)
    g1, g2 = play_ppo(pol, 3, seed=7, greedy=True), play_ppo(pol, 3, seed=7, greedy=True, n_envs=2)
    torch.testing.assert_close(g1.actions, g2.actions)
    assert "greedy" in g1.source


def test_a_recurrent_policy_collects_too(tmp_path):
    run = tmp_path / "gru"
    train_ppo(PPOConfig(env="MiniGrid-MemoryS7-v0", steps=128, **TINY), run)
    data = collect_ppo(run, "MiniGrid-MemoryS7-v0", 3, tmp_path / "data", n_envs=2)
    assert data.n_episodes == 3 and data.source.startswith(f"ppo:{run.name}@128")
    one = play_ppo(load_ppo_policy(run), 3, n_envs=1)
    torch.testing.assert_close(one.actions, data.actions)


def test_collection_errors_name_the_value(empty_agent, tmp_path):
    run = empty_agent.run_dir
    with pytest.raises(ValueError, match="trained on MiniGrid-Empty-5x5-v0, not MiniGrid-MemoryS7-v0"):
        collect_ppo(run, "MiniGrid-MemoryS7-v0", 2, tmp_path / "d")
    with pytest.raises(ValueError, match="supported"):
        collect_ppo(run, "MiniGrid-Nope-v0", 2, tmp_path / "d")
    with pytest.raises(RunError, match=r"no intact checkpoint of step 777; it has \[0, 1024"):
        collect_ppo(run, EMPTY, 2, tmp_path / "d", checkpoints=[777])
    data = collect_ppo(run, EMPTY, 2, tmp_path / "d")
    with pytest.raises(RunError, match="expected a PPO training run"):
        load_ppo_policy(tmp_path / "d")
    with pytest.raises(ValueError, match="epsilon"):
        play_ppo(load_ppo_policy(run), 2, epsilon=2.0)
    assert data.n_episodes == 2
    assert not (tmp_path / "never").exists()


# ---- the CLI --------------------------------------------------------------------------------------
def test_cli_ppo_then_collect_with_the_policy(tmp_path):
    run, data = tmp_path / "ppo", tmp_path / "data"
    res = runner.invoke(app, ["dt", "ppo", EMPTY, "--steps", "512", "--n-envs", "4", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert str(run) in res.output and "step 512" in res.output
    res = runner.invoke(
        app,
        ["dt", "collect", EMPTY, "--policy", str(run), "--checkpoints", "0,512", "--episodes", "4", "--out", str(data)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert str(data) in res.output and f"ppo:{run.name}@0,512" in res.output
    assert load_trajectories(data).n_episodes == 4


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["dt", "ppo", "MiniGrid-Nope-v0", "--steps", "10", "--out", "{tmp}/a"], "supported"),
        (["dt", "ppo", EMPTY, "--steps", "10", "--memory", "lstm", "--out", "{tmp}/a"], "valid: gru, none"),
        (["dt", "collect", EMPTY, "--policy", "{tmp}", "-n", "2", "--out", "{tmp}/b"], "expected a PPO"),
        (["dt", "collect", EMPTY, "--checkpoints", "0", "-n", "2", "--out", "{tmp}/b"], "--policy"),
        (["dt", "collect", EMPTY, "--policy", "{tmp}", "--skill-mix", "0,0.1", "-n", "2", "--out", "{tmp}/b"],
         "--skill-mix"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line(tmp_path, args, named):
    res = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code != 0
    assert named in res.output and "Traceback" not in res.output


def test_cli_collect_with_a_policy_of_another_env(empty_agent, tmp_path):
    res = runner.invoke(
        app,
        ["dt", "collect", "MiniGrid-MemoryS7-v0", "--policy", str(empty_agent.run_dir), "-n", "2", "--out",
         str(tmp_path / "d")],
    )  # fmt: skip
    assert res.exit_code != 0 and "trained on MiniGrid-Empty-5x5-v0" in res.output


def test_vector_env_disabled_autoreset_replays():
    """The trainer's resume rests on this: a vector env reset with a seed and stepped equals a fresh one."""
    a, b = make_vector_env(EMPTY, 2, 0, autoreset_mode="Disabled"), make_vector_env(EMPTY, 2, 5)
    oa, _ = a.reset(seed=[11, 12])
    ob, _ = b.reset(seed=[11, 12])
    np.testing.assert_array_equal(oa, ob)
