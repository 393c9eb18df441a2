"""``interplab dt collect|train|eval|analyze``: each writes the run folder the next reads, prints where it went,
and bad input (an unknown env, data of another env, a folder of another kind) ends in one line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from interplab import runs
from interplab.cli.main import app
from interplab.runs import Kind

minigrid = pytest.importorskip("minigrid")

from interplab.rl.envs import make_env  # noqa: E402
from interplab.rl.model import DecisionTransformer, DTConfig, save_dt  # noqa: E402
from interplab.rl.trajectories import Trajectories  # noqa: E402

ENV = "MiniGrid-MemoryS7-v0"
runner = CliRunner()


def random_trajectories(env_name: str, n: int, max_len: int = 12, seed: int = 0) -> Trajectories:
    """Episodes of a random policy in the real environment (seeds seed + e), cut at ``max_len`` steps."""
    g = torch.Generator().manual_seed(seed)
    obs, actions, rewards, dones, starts = [], [], [], [], [0]
    for e in range(n):
        env = make_env(env_name, seed=seed + e)
        o, _ = env.reset(seed=seed + e)
        for t in range(max_len):
            a = int(torch.randint(0, 3, (), generator=g))  # left, right, forward
            o2, r, term, trunc, _ = env.step(a)
            obs.append(torch.as_tensor(o))
            actions.append(a)
            rewards.append(float(r))
            end = term or trunc or t == max_len - 1
            dones.append(bool(term or trunc))
            o = o2
            if end:
                break
        starts.append(len(actions))
    return Trajectories(
        env=env_name,
        obs=torch.stack(obs),
        actions=torch.tensor(actions),
        rewards=torch.tensor(rewards),
        dones=torch.tensor(dones),
        episode_starts=torch.tensor(starts),
        seeds=torch.arange(seed, seed + n),
        source="random",
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtcli")
    random_trajectories(ENV, 8).save(root / "data")
    random_trajectories("MiniGrid-Empty-5x5-v0", 2).save(root / "empty")
    torch.manual_seed(0)
    cfg = DTConfig(env=ENV, context=4, max_timestep=245, d_model=32, n_layers=2, n_heads=2)
    save_dt(DecisionTransformer(cfg), root / "model")
    return root


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_analyze_writes_probes_dla_and_the_decision_attention(lab):
    out = lab / "analysis"
    r = _run("dt", "analyze", lab / "model", "--data", lab / "data", "--out", out, "--episodes", "6")
    assert r.exit_code == 0, r.output
    assert runs.detect(out) is Kind.DT_ANALYSIS and f"analysis: {out}" in r.output.replace("\n", "")
    report = runs.Report.open(out).data
    assert report["episodes"] == 6 and report["env"] == ENV
    assert set(report["probes"]) >= {"instruction", "direction"}
    inst = report["probes"]["instruction"]
    assert inst["sites"] == [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_post",
    ]
    assert all(0 <= s <= 1 for s in inst["test_scores"])
    att = report["attention"]
    assert att["tokens"] == ["R-3", "s-3", "a-3", "R-2", "s-2", "a-2", "R-1", "s-1", "a-1", "R0", "s0", "a0"]
    data = runs.open_run(lab / "data")
    assert isinstance(data, runs.TrajectoriesDir)
    from interplab.rl import load_trajectories

    trajs = load_trajectories(lab / "data")
    for e, rows in att["episodes"].items():
        assert len(rows) == int(trajs.lengths[int(e)])
        for t, row in enumerate(rows):
            torch.testing.assert_close(sum(row), 1.0, atol=2e-3, rtol=0)  # a distribution over the window
            assert all(x == 0 for x in row[-1:])  # the decision token never reads its own action
            pads = 3 * max(0, 3 - t)  # a window of 4 steps is left-padded early in the episode
            assert all(x == 0 for x in row[:pads])
    for name in report["pictures"]:
        assert (out / name).is_file()
    assert "probe instruction: best" in r.output


def test_analyze_attention_equals_the_models_own_pattern(lab):
    """The recorded row is the head-mean of the last layer's pattern at the decision token (a recomputation)."""
    from interplab.rl import analysis as an
    from interplab.rl import load_dt, load_trajectories

    report = json.loads((lab / "analysis" / runs.REPORT).read_text())
    model, trajs = load_dt(lab / "model"), load_trajectories(lab / "data")
    lo = int(trajs.episode_starts[1])
    win = an.windows(trajs, 4, ends=[lo + 5])
    pattern = torch.stack([an.attention_pattern(model, win, 1, h) for h in range(2)]).mean(0)
    expected = pattern[an.token_position(3, "state")]  # all 12 tokens are real at step 5
    torch.testing.assert_close(
        torch.tensor(report["attention"]["episodes"]["1"][5]), expected, atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "args, named",
    [
        (["dt", "analyze", "{model}", "--data", "{empty}", "--out", "{out}"], "MiniGrid-Empty-5x5-v0"),
        (
            ["dt", "analyze", "{data}", "--data", "{data}", "--out", "{out}"],
            "expected a decision transformer",
        ),
        (
            ["dt", "analyze", "{model}", "--data", "{model}", "--out", "{out}"],
            "expected a trajectory data set",
        ),
        (["dt", "analyze", "{model}", "--data", "{data}", "--out", "{data}"], "choose another output folder"),
        (["dt", "analyze", "{model}", "--data", "{data}", "--out", "{out}", "-n", "0"], "'-n'"),
    ],
)
def test_bad_input_is_one_line(lab, args, named):
    before = sorted(p.name for p in (lab / "data").iterdir())
    values = {"model": lab / "model", "data": lab / "data", "empty": lab / "empty", "out": lab / "bad-out"}
    r = runner.invoke(app, [a.format(**values) for a in args])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and named in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.output
    assert sorted(p.name for p in (lab / "data").iterdir()) == before


def test_train_then_eval_write_the_folders_the_next_command_reads(lab):
    run, ev = lab / "train", lab / "eval"
    r = _run("dt", "train", lab / "data", "--preset", "memory-dt-tiny", "--steps", "4", "--out", run)
    assert r.exit_code == 0, r.output
    assert runs.detect(run) is Kind.DT_TRAIN and runs.DTTrainRun.open(run).has_final
    assert "step 4: loss" in r.output and f"run directory: {run}" in " ".join(r.output.split())
    r = _run("dt", "train", lab / "data", "--preset", "memory-dt-tiny", "--steps", "4", "--out", run)
    assert r.exit_code == 0 and "resumed from step 4" in r.output  # the finished run is found, not redone

    r = _run("dt", "eval", run, "--targets", "0,0.5,0.95", "--episodes", "3", "--n-envs", "3", "--out", ev)
    assert r.exit_code == 0, r.output
    assert f"loaded {run / runs.FINAL}" in r.output and "slope of achieved on target return" in r.output
    opened = runs.DTEvalRun.open(ev)
    assert opened.data["targets"] == [0.0, 0.5, 0.95] and opened.data["counts"] == [3, 3, 3]
    assert opened.rollouts == ev / runs.ROLLOUTS and (ev / "calibration.html").is_file()
    # the range of the run's data is recorded by train and checked by eval: the random policy never succeeds
    assert opened.data["data_range"] == [0.0, 0.0]
    assert "warning: target returns [0.5, 0.95] lie outside the training data's return range" in " ".join(
        r.output.split()
    )
    from interplab.rl.calibration import Calibration

    cal = Calibration.load(ev)
    table = r.output.split("mean return")[1]
    for t, m in zip(cal.targets, cal.mean_returns, strict=True):
        assert f"{t:g}" in table and f"{m:.3f}" in table


@pytest.mark.parametrize(
    "args, named",
    [
        (["dt", "train", "{data}", "--preset", "nope", "--out", "{out}"], "unknown DT preset 'nope'"),
        (["dt", "train", "{model}", "--out", "{out}"], "expected a trajectory data set"),
        (["dt", "train", "{data}", "--steps", "0", "--out", "{out}"], "'--steps'"),
        (["dt", "eval", "{data}", "--out", "{out}"], "expected a decision transformer"),
        (["dt", "eval", "{model}", "--targets", "a,b", "--out", "{out}"], "'a,b'"),
        (["dt", "eval", "{model}", "--data", "{empty}", "--out", "{out}"], "MiniGrid-Empty-5x5-v0"),
        (["dt", "eval", "{model}", "--temperature", "-1", "--out", "{out}"], "-1"),
        (["dt", "collect", "MiniGrid-Nope-v0", "-n", "2", "--out", "{out}"], "MiniGrid-MemoryS7-v0"),
        (
            ["dt", "collect", ENV, "-n", "2", "--epsilon", "2", "--out", "{out}"],
            "'--epsilon': 2.0 is not a probability",
        ),
        (["dt", "collect", ENV, "-n", "2", "--out", "{data}/manifest.json"], "is a file"),
    ],
)
def test_bad_input_of_train_eval_collect_is_one_line(lab, args, named):
    test_bad_input_is_one_line(lab, args, named)


def test_collect_writes_a_data_set_train_reads(lab):
    out = lab / "collected"
    args = ["dt", "collect", ENV, "-n", "12", "--skill-mix", "0,0.3", "--wrong-object", "0.3", "--out", out]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    t = runs.TrajectoriesDir.open(out)
    assert t.env == ENV and (out / "summary.html").is_file()
    from interplab.rl import collect, load_trajectories

    data = load_trajectories(out)
    again = collect(ENV, 12, lab / "collected-lib", skill_mix=(0.0, 0.3), wrong_object=0.3)
    torch.testing.assert_close(data.actions, again.actions)  # the CLI passes its options through unchanged
    torch.testing.assert_close(data.seeds, torch.arange(12))
    lo, hi = float(data.returns.min()), float(data.returns.max())
    flat = " ".join(r.output.split())
    assert f"12 episodes, {data.n_steps:,} steps" in flat and f"returns {lo:.3f} to {hi:.3f}" in flat
    assert f"trajectories: {out}" in flat
    r = _run(*args)  # a finished collection is found and returned as it is
    assert r.exit_code == 0 and sorted(p.name for p in out.iterdir()).count("shard_00000.safetensors") == 1
