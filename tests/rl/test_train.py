"""Training decision transformers: windows, the run folder, bit-exact resume, learning a memory task."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from interplab import runs
from interplab.rl.model import DecisionTransformer, DTConfig, load_dt
from interplab.rl.train import (
    DTTrainConfig,
    WindowSampler,
    action_loss,
    check_data,
    decision_weights,
    dt_preset,
    evaluate_windows,
    split_steps,
    train_dt,
    trajectory_windows,
)
from interplab.rl.trajectories import Trajectories
from interplab.train.config import CheckpointConfig

ENV = "MiniGrid-MemoryS7-v0"
KEY, BALL = 5, 6  # MiniGrid's object indices


def memory_data(n_episodes: int, seed: int = 0, corridor: tuple[int, int] = (3, 7)) -> Trajectories:
    """A memory task in MiniGrid's observation format: step 0 shows the instruction (a key or a ball) in front
    of the agent, then a corridor of blank views walked forward (action 2), then a junction view where the
    expert turns left (0) for a key and right (1) for a ball; an epsilon of the episodes turn the wrong way and
    earn nothing (so returns vary)."""
    rng = np.random.default_rng(seed)
    obs, actions, rewards, starts = [], [], [], [0]
    for _ in range(n_episodes):
        instruction = KEY if rng.random() < 0.5 else BALL
        length = int(rng.integers(corridor[0], corridor[1] + 1))
        views = np.zeros((length + 2, 7, 7, 3), dtype=np.uint8)
        views[:, :, :, 0] = 1  # empty
        views[:, 0, :, 0] = 2  # a wall on the left edge
        views[0, 3, 5] = (instruction, 1 if instruction == KEY else 2, 0)
        views[1:-1, 3, 6, 0] = 1  # corridor
        views[-1, 3, 1] = (2, 5, 0)  # the junction: a wall ahead
        good = rng.random() > 0.1
        turn = (0 if instruction == KEY else 1) if good else (1 if instruction == KEY else 0)
        acts = [2] * (length + 1) + [turn]
        rew = [0.0] * (length + 1) + [1.0 - 0.9 * (length + 2) / 245 if good else 0.0]
        obs.append(views)
        actions += acts
        rewards += rew
        starts.append(starts[-1] + length + 2)
    n = starts[-1]
    dones = np.zeros(n, dtype=bool)
    dones[np.array(starts[1:]) - 1] = True
    return Trajectories(
        env=ENV,
        obs=np.concatenate(obs),
        actions=np.array(actions, dtype=np.int64),
        rewards=np.array(rewards, dtype=np.float32),
        dones=dones,
        episode_starts=np.array(starts, dtype=np.int64),
        seeds=np.arange(n_episodes, dtype=np.int64),
    )


def tiny_model(context: int = 10) -> DTConfig:
    return DTConfig(env=ENV, context=context, max_timestep=245, d_model=32, n_layers=2, n_heads=2, d_mlp=64)


def test_windows_equal_a_loop_over_steps():
    data = memory_data(6, seed=3)
    context = 4
    w = trajectory_windows(data, context)
    assert len(w) == len(data.actions)
    rtg, ts = data.rtg, data.timesteps
    for end in range(len(data.actions)):
        episode = int(torch.searchsorted(data.episode_starts, torch.tensor(end), right=True)) - 1
        first = max(int(data.episode_starts[episode]), end - context + 1)
        steps = list(range(first, end + 1))
        pad = context - len(steps)
        assert w.mask[end].tolist() == [False] * pad + [True] * len(steps)
        assert w.actions[end, pad:].tolist() == data.actions[steps].tolist()
        assert w.actions[end, :pad].tolist() == [7] * pad
        assert w.timesteps[end, pad:].tolist() == ts[steps].tolist()
        assert torch.equal(w.obs[end, pad:], torch.as_tensor(data.obs[steps]))
        assert_close(w.rtg[end, pad:], torch.as_tensor(rtg[steps]))
        assert not w.obs[end, :pad].any() and not w.rtg[end, :pad].any()
    # the first step of each episode is a window of one real step
    assert w.mask[torch.as_tensor(data.episode_starts[:-1])].sum(1).tolist() == [1] * 6
    drawn = trajectory_windows(data, context, n=50, seed=1)
    assert torch.equal(drawn.obs, w.obs[drawn.ends]) and torch.equal(drawn.mask, w.mask[drawn.ends])
    assert torch.equal(drawn.ends, trajectory_windows(data, context, n=50, seed=1).ends)


def test_windows_refuse_ends_outside_the_data():
    data = memory_data(3)
    with pytest.raises(ValueError, match="window ends"):
        WindowSampler(data, 4).windows(torch.tensor([10_000]))
    with pytest.raises(ValueError, match="context"):
        WindowSampler(data, 0)


def test_train_config_round_trip_and_validation():
    cfg = DTTrainConfig(steps=10, checkpoints=CheckpointConfig(log_spaced=3, every=4))
    again = DTTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    for change, message in [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"decision_weight": 0.0}, "decision_weight"),
    ]:
        with pytest.raises(ValueError, match=message):
            cfg.replace(**change)
    with pytest.raises(ValueError, match="unknown DTTrainConfig fields"):
        DTTrainConfig.from_dict({"stesp": 3})
    model_cfg, train_cfg = dt_preset("memory-dt-tiny")
    assert model_cfg.env == ENV and model_cfg.max_timestep == 245
    with pytest.raises(ValueError, match="memory-dt-tiny"):
        dt_preset("memory-dt-huge")


def _short(steps: int = 12) -> DTTrainConfig:
    return DTTrainConfig(
        steps=steps,
        batch_size=8,
        warmup=2,
        eval_every=4,
        eval_windows=64,
        log_every=2,
        checkpoints=CheckpointConfig(log_spaced=3),
    )


def test_train_writes_a_run_folder(tmp_path):
    data = memory_data(20)
    events = []
    result = train_dt(tiny_model(), _short(), data, tmp_path / "run", progress=events.append)
    run = runs.DTTrainRun.open(tmp_path / "run")
    assert runs.detect(tmp_path / "run") is runs.Kind.DT_TRAIN
    assert run.config["model"] == tiny_model().to_dict()
    assert run.config["data"]["n_episodes"] == 20 and run.config["data"]["env"] == ENV
    assert run.config["data"]["return_max"] == pytest.approx(float(data.returns.max()))
    steps = [c.step for c in run.checkpoints()]
    assert steps[0] == 0 and steps[-1] == 12 and steps == list(result.checkpoints) and len(steps) >= 4
    assert run.has_final
    model = load_dt(tmp_path / "run")  # the run stands for its final/
    ckpt = load_dt(run.checkpoints()[-1].path)
    for (k, v), v2 in zip(model.state_dict().items(), ckpt.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    report = runs.read_json(tmp_path / "run" / runs.REPORT, runs.Kind.DT_TRAIN_REPORT)
    assert report["finished"] and report["step"] == 12 and report["tokens"] == 12 * 8 * 30
    rows = runs.read_log(tmp_path / "run")
    logged = [r["step"] for r in rows if "loss" in r]
    assert logged == sorted(set(logged)) and 12 in logged
    assert {"val_loss", "val_accuracy"} <= set(next(r for r in rows if r.get("step") == 12))
    assert result.val_accuracy == pytest.approx(rows[-1]["val_accuracy"])
    assert {e["event"] for e in events} >= {"setup", "step", "checkpoint", "done"}
    # the same folder with another config is refused, as is a folder of something else
    with pytest.raises(ValueError, match="different config"):
        train_dt(tiny_model(), _short().replace(lr=1e-2), data, tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a DT training run"):
        train_dt(tiny_model(), _short(), data, tmp_path / "other")
    with pytest.raises(ValueError, match="trajectories are of"):
        train_dt(tiny_model().replace(env="MiniGrid-Empty-5x5-v0"), _short(), data, tmp_path / "x")


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    data = memory_data(20)
    through = train_dt(tiny_model(), _short(), data, tmp_path / "a")
    stopped = train_dt(tiny_model(), _short(), data, tmp_path / "b", stop_after=5)
    assert stopped.step == 5 and not runs.DTTrainRun.open(tmp_path / "b").has_final
    resumed = train_dt(tiny_model(), _short(), data, tmp_path / "b")
    assert resumed.resumed_from == 5 and resumed.step == 12
    a, b = load_dt(tmp_path / "a"), load_dt(tmp_path / "b")
    for (k, v), v2 in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    assert resumed.loss == through.loss and resumed.val_loss == through.val_loss
    rows_a = [r for r in runs.read_log(tmp_path / "a") if "loss" in r]
    rows_b = [r for r in runs.read_log(tmp_path / "b") if "loss" in r]
    assert [(r["step"], r["loss"]) for r in rows_a] == [(r["step"], r["loss"]) for r in rows_b]


def test_checked_forward_equals_the_forward():
    """The training loop's `forward_checked` (inputs validated once by `check_data`) gives the forward's
    logits bit for bit, on windows with and without left padding, and so the same loss."""
    data = memory_data(8, corridor=(1, 4))
    torch.manual_seed(0)
    model = DecisionTransformer(tiny_model(context=4)).train()
    sampler = WindowSampler(data, 4)
    check_data(model, sampler)
    weight = torch.rand(sampler.n_steps) + 0.5
    for ends in (torch.arange(sampler.n_steps), torch.tensor([3, 9, sampler.n_steps - 1])):
        w = sampler.windows(ends)
        mask = None if bool(w.mask.all()) else w.mask
        assert torch.equal(
            model.forward_checked(w.rtg, w.obs, w.actions, w.timesteps, mask), model(*w.inputs())
        )
        for sw in (None, weight):
            fast, slow = action_loss(model, w, sw, checked=True), action_loss(model, w, sw)
            assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert not bool(sampler.windows(torch.tensor([0])).mask.all())  # the padded case was exercised


def test_training_refuses_data_the_model_cannot_read(tmp_path):
    """`check_data` runs every step through the model's input checks once (the loop then skips them)."""
    data = memory_data(6)
    obs = data.obs.clone()
    obs[-1, 2, 2, 0] = 11  # MiniGrid has 11 object types: 0..10
    bad = dataclasses.replace(data, obs=obs)  # Trajectories checks actions, not observation values
    with pytest.raises(ValueError, match="observation value 11"):
        train_dt(tiny_model(), _short(), bad, tmp_path / "run")


def test_logged_validation_is_the_trained_models(tmp_path):
    """The validation logged at the last step is that of the final weights: the fused AdamW step writes the
    weights without bumping their version counters, which the attention's cached fused QKV keys on (a stale
    cache gave the first evaluation's weights)."""
    data = memory_data(30)
    cfg = _short()
    result = train_dt(tiny_model(), cfg, data, tmp_path / "run")
    model = load_dt(tmp_path / "run")
    sampler = WindowSampler(data, model.cfg.context, pad_action=model.cfg.pad_action)
    _, val_steps = split_steps(sampler, cfg)
    want = evaluate_windows(model, sampler.windows(val_steps))
    assert_close(torch.tensor(result.val_loss), torch.tensor(want["val_loss"]), rtol=1e-6, atol=0)
    assert result.val_accuracy == want["val_accuracy"]


@pytest.mark.slow
def test_a_tiny_dt_learns_the_memory_task(tmp_path):
    """The decision at the junction needs the instruction seen at step 0 (no longer in view): the model must
    carry it through attention; a random policy gets 1/7 of actions right, always-forward gets the corridor."""
    train = memory_data(300, seed=0, corridor=(1, 4))
    held_out = memory_data(100, seed=1, corridor=(1, 4))
    # (the decision is learnt after a plateau: at 600 steps the model still always turned one way)
    cfg = DTTrainConfig(steps=1500, batch_size=32, lr=1e-3, warmup=20, eval_every=500, val_fraction=0.1)
    result = train_dt(tiny_model(), cfg, train, tmp_path / "run")
    model = load_dt(tmp_path / "run")
    sampler = WindowSampler(held_out, model.cfg.context)
    decision_steps = torch.as_tensor(held_out.episode_starts[1:] - 1)
    windows = sampler.windows(decision_steps)
    with torch.no_grad():
        chosen = model(*windows.inputs())[:, -1].argmax(-1)
    instruction = torch.as_tensor(held_out.obs[held_out.episode_starts[:-1], 3, 5, 0]).long()
    expert = torch.where(instruction == KEY, 0, 1)
    returns = torch.as_tensor(held_out.returns)
    good = returns > 0  # conditioned on a high return, the model turns the instruction's way
    decision_accuracy = float((chosen[good] == expert[good]).float().mean())
    overall = evaluate_windows(model, sampler.windows(torch.arange(sampler.n_steps)))["val_accuracy"]
    random_accuracy = 1 / 7
    assert overall > 0.9 > random_accuracy * 3, (overall, result)
    assert decision_accuracy > 0.9, decision_accuracy
    assert 0.3 < float((chosen == 0).float().mean()) < 0.7  # both turns are taken, as the instructions ask


def test_weighted_action_loss_equals_a_loop_over_steps():
    """``step_weight`` weights each real step's cross-entropy by its flat step's weight (a hand-written loop
    over the windows is the reference); all-ones weights give the unweighted loss."""
    data = memory_data(6, corridor=(1, 3))
    torch.manual_seed(0)
    model = DecisionTransformer(tiny_model(context=4)).eval()
    sampler = WindowSampler(data, 4)
    ends = torch.tensor([0, 2, 5, 7, sampler.n_steps - 1])
    w = sampler.windows(ends)
    weight = torch.rand(sampler.n_steps) + 0.5
    with torch.no_grad():
        ce, count, correct = action_loss(model, w, weight)
        plain = action_loss(model, w)
        ones = action_loss(model, w, torch.ones(sampler.n_steps))
        logits = model(*w.inputs())
    want_ce, want_count = torch.zeros(()), torch.zeros(())
    for b, end in enumerate(ends.tolist()):
        for t in range(4):
            step = end - 3 + t
            if bool(w.mask[b, t]):
                assert step >= 0 and int(data.actions[step]) == int(w.actions[b, t])
                want_ce += weight[step] * torch.nn.functional.cross_entropy(logits[b, t], w.actions[b, t])
                want_count += weight[step]
    assert_close(ce, want_ce)
    assert_close(count, want_count)
    assert int(correct) == int(plain[2])
    assert_close(ones[0], plain[0])
    assert_close(ones[1], plain[1].float())


def test_decision_weights_mark_the_memory_split(tmp_path):
    pytest.importorskip("minigrid")
    from interplab.rl.expert import collect
    from interplab.rl.labels import decision_steps

    data = collect(ENV, 12, tmp_path / "data", seed=3, skill_mix=[0.0, 0.2], wrong_object=0.3)
    weight = decision_weights(data, 10.0)
    assert weight is not None and weight.shape == (data.n_steps,)
    steps = decision_steps(data)
    want = torch.ones(data.n_steps)
    want[steps[steps >= 0]] = 10.0
    assert_close(weight, want)
    assert decision_weights(data, 1.0) is None


def test_a_run_written_before_decision_weight_resumes(tmp_path):
    """A run folder whose config predates ``decision_weight`` reads it as the default and resumes."""
    data = memory_data(20)
    train_dt(tiny_model(), _short(), data, tmp_path / "run", stop_after=5)
    config = runs.read_json(tmp_path / "run" / runs.CONFIG, runs.Kind.DT_TRAIN, strip=True)
    del config["train"]["decision_weight"]
    runs.write_json(tmp_path / "run" / runs.CONFIG, runs.Kind.DT_TRAIN, config)
    resumed = train_dt(tiny_model(), _short(), data, tmp_path / "run")
    assert resumed.resumed_from == 5 and resumed.step == 12


@pytest.mark.slow
def test_a_tiny_dt_trained_on_expert_memory_data_beats_random_on_held_out_episodes(tmp_path):
    pytest.importorskip("minigrid")
    from interplab.rl.expert import collect

    mix = dict(skill_mix=[0.0, 0.1, 0.3], wrong_object=0.2)  # returns vary, as RTG conditioning needs
    train = collect(ENV, 200, tmp_path / "train", seed=0, **mix)
    held_out = collect(ENV, 60, tmp_path / "held_out", seed=10_000, **mix)
    cfg = DTTrainConfig(steps=400, batch_size=32, lr=1e-3, warmup=20, eval_every=200, val_fraction=0.1)
    train_dt(tiny_model(context=12), cfg, train, tmp_path / "run")
    model = load_dt(tmp_path / "run")
    sampler = WindowSampler(held_out, model.cfg.context)
    accuracy = evaluate_windows(model, sampler.windows(torch.arange(sampler.n_steps)))["val_accuracy"]
    random_accuracy = 1 / 7
    majority = float(torch.bincount(train.actions, minlength=7).max()) / train.n_steps  # always "forward"
    assert accuracy > max(3 * random_accuracy, majority + 0.1), (accuracy, majority)


DDP_WORKER = """
import json, sys
import torch
from interplab.rl.model import DTConfig
from interplab.rl.train import DTTrainConfig, train_dt
from interplab.rl.trajectories import load_trajectories

torch.set_num_threads(1)
cfg = json.loads(open(sys.argv[1]).read())
train_dt(DTConfig.from_dict(cfg["model"]), DTTrainConfig.from_dict(cfg["train"]), load_trajectories(sys.argv[2]),
         sys.argv[3], device="cpu")
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_train_like_one(tmp_path):
    import os
    import subprocess
    import sys

    data = memory_data(20)
    data.save(tmp_path / "data")
    model_cfg, cfg = tiny_model(), _short(8)
    train_dt(model_cfg, cfg, data, tmp_path / "one", device="cpu")
    (tmp_path / "cfg.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()}))
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [
        str(tmp_path / "worker.py"),
        str(tmp_path / "cfg.json"),
        str(tmp_path / "data"),
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    one = [r for r in runs.read_log(tmp_path / "one") if "loss" in r]
    two = [r for r in runs.read_log(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=1e-5
    )
    a, b = load_dt(tmp_path / "one"), load_dt(tmp_path / "two")
    for (k, v), v2 in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        # Adam divides by sqrt(v): where a gradient is ~0, all-reduce rounding moves a weight by ~1e-5
        assert_close(v2, v, rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
