"""`interplab llc RUN`: per-checkpoint LLC estimates written into a tiny run, equal to `estimate_llc` called
on each checkpoint by hand, resumed without resampling, joined to the formation report (seconds)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.testing import assert_close
from typer.testing import CliRunner

from interplab import runs
from interplab.analysis.formation import FormationResult
from interplab.cli.main import app
from interplab.dynamics import SGLDConfig, estimate_llc, head_component, lm_loss
from interplab.dynamics import run as run_llc
from interplab.dynamics.run import RunLLC, formation_llc_figure, llc_along_run, parse_components, run_tokens
from interplab.model.io import load_native
from interplab.train import train
from tests.train.conftest import _tiny_config, write_corpus

CFG = SGLDConfig(step_size=1e-4, chains=2, draws=6, burn_in=2, batch_size=2)
ARGS = [
    "--draws",
    "6",
    "--burn-in",
    "2",
    "--chains",
    "2",
    "--seqs",
    "4",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("llc")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INTERPLAB_CACHE", str(root / "cache"))
        cfg = _tiny_config(write_corpus(root / "corpus"), steps=6)
        train(cfg, root / "run")
        yield root / "run"


@pytest.fixture
def run_dir(tiny_run, tmp_path, monkeypatch):
    """A fresh copy of the tiny run per test (the cache stays shared)."""
    import shutil

    monkeypatch.setenv("INTERPLAB_CACHE", str(tiny_run.parent / "cache"))
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def test_the_run_curve_equals_estimate_llc_per_checkpoint(run_dir):
    result = llc_along_run(run_dir, CFG, components=["L1H0"], n_seqs=4, seq_len=16)
    steps = [c.step for c in runs.TrainRun.open(run_dir).checkpoints()]
    assert list(result.steps) == steps and result.components == ("all", "L1H0")
    tokens = run_tokens(run_dir, 4, 16)
    for i, ckpt in enumerate(runs.TrainRun.open(run_dir).checkpoints()):
        model = load_native(ckpt.path)
        total = estimate_llc(model, (tokens,), lm_loss, CFG)
        head = estimate_llc(model, (tokens,), lm_loss, CFG, component=head_component(model, 1, 0))
        torch.testing.assert_close(result.llc["all"][i], total.llc)
        torch.testing.assert_close(result.llc["L1H0"][i], head.llc)
        torch.testing.assert_close(result.estimates[ckpt.step]["all"].trace, total.trace)
    assert result.estimates[steps[0]]["L1H0"].n_params < result.estimates[steps[0]]["all"].n_params


def test_a_second_job_reads_back_what_the_first_estimated(run_dir, monkeypatch):
    first = llc_along_run(run_dir, CFG, n_seqs=4, seq_len=16, steps=[0, 3])
    assert first.resumed == ()

    def boom(*a, **k):
        raise AssertionError("resampled a checkpoint that was already estimated")

    with monkeypatch.context() as mp:
        mp.setattr(run_llc, "estimate_llc", boom)
        again = llc_along_run(run_dir, CFG, n_seqs=4, seq_len=16, steps=[0, 3])
    assert again.resumed == (0, 3) and again.llc == first.llc
    torch.testing.assert_close(again.estimates[3]["all"].trace, first.estimates[3]["all"].trace)
    # other settings are sampled again, the rest read back
    more = llc_along_run(run_dir, CFG, n_seqs=4, seq_len=16, steps=[0, 3, 6])
    assert more.resumed == (0, 3)
    other = llc_along_run(run_dir, SGLDConfig(**{**vars(CFG), "seed": 1}), n_seqs=4, seq_len=16, steps=[0])
    assert other.resumed == () and other.llc["all"][0] != first.llc["all"][0]


def test_llc_command_writes_the_run_folder_and_joins_the_formation_report(run_dir):
    formation = CliRunner().invoke(app, ["formation", str(run_dir), "--seqs", "2"])
    assert formation.exit_code == 0, formation.output
    out = CliRunner().invoke(app, ["llc", str(run_dir), *ARGS, "-c", "layers", "--every", "2"])
    assert out.exit_code == 0, out.output
    folder = run_dir / runs.LLC
    report = runs.read_json(folder / runs.REPORT, runs.Kind.LLC)
    all_steps = [c.step for c in runs.TrainRun.open(run_dir).checkpoints()]
    assert report["steps"] == sorted(set(all_steps[::2]) | {all_steps[-1]})
    assert report["components"] == ["all", "layer 0", "layer 1"]
    assert runs.detect(folder) is runs.Kind.LLC
    for step in report["steps"]:
        doc = runs.read_json(folder / runs.LLC_ESTIMATES / f"{runs.checkpoint_name(step)}.json")
        assert doc["kind"] == "llc_checkpoint" and len(doc["estimates"]["all"]["trace"]) == 2
    assert RunLLC.open(run_dir).llc == RunLLC.open(folder).llc
    assert "LLC" in (run_dir / runs.FORMATION / "formation_llc.html").read_text()
    said = out.stdout.replace("\n", "")
    assert str(folder / runs.REPORT) in said and "formation_llc.html" in said
    again = CliRunner().invoke(app, ["llc", str(run_dir), *ARGS, "-c", "layers", "--every", "2"])
    assert again.exit_code == 0 and f"{len(report['steps'])} checkpoints read back" in again.stdout.replace(
        "\n", " "
    )
    # `interplab formation` redraws the joined picture once an LLC exists
    (run_dir / runs.FORMATION / "formation_llc.html").unlink()
    formation = CliRunner().invoke(app, ["formation", str(run_dir), "--seqs", "2"])
    assert formation.exit_code == 0 and (run_dir / runs.FORMATION / "formation_llc.html").is_file()
    fig = RunLLC.open(folder).plot()
    assert {t.name for t in fig.data} >= {"LLC", "layer 0", "layer 1"}
    # the joined picture crosses out the estimates whose chains have not mixed, as the LLC's own plot does
    # (2 chains x 6 draws: none has)
    llc = RunLLC.open(folder)
    formation_doc = runs.read_json(run_dir / runs.FORMATION / runs.FORMATION_JSON, runs.Kind.FORMATION)
    joined = formation_llc_figure(FormationResult.from_dict(formation_doc), llc)
    crossed = {t.name: len(t.x) for t in joined.data if "R-hat >" in (t.name or "")}
    assert crossed and crossed == {t.name: len(t.x) for t in fig.data if "R-hat >" in (t.name or "")}
    assert sum(crossed.values()) == len(llc.not_mixed())


def test_bad_components_and_steps_are_named(run_dir):
    model = load_native(runs.TrainRun.open(run_dir).checkpoints()[0].path)
    assert [c.name for c in parse_components(model, ["heads"])] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    with pytest.raises(ValueError, match="unknown component 'mlp'.*heads"):
        parse_components(model, ["mlp"])
    with pytest.raises(ValueError, match="'L5H0'.*2 layers"):
        parse_components(model, ["L5H0"])
    with pytest.raises(ValueError, match=r"no intact checkpoint at steps \[5\]"):
        llc_along_run(run_dir, CFG, n_seqs=4, seq_len=16, steps=[5])
    out = CliRunner().invoke(app, ["llc", str(run_dir), *ARGS, "-c", "L9H9"])
    assert out.exit_code == 2 and "L9H9" in out.output
    out = CliRunner().invoke(app, ["llc", str(run_dir), *ARGS, "--step-size", "10"])
    assert out.exit_code == 2 and "SGLD diverged" in out.output and "smaller step_size" in out.output


def test_the_report_survives_json(run_dir):
    result = llc_along_run(run_dir, CFG, n_seqs=4, seq_len=16, steps=[0, 6])
    back = RunLLC.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.llc == result.llc and back.steps == result.steps and back.config == result.config


@pytest.mark.filterwarnings("ignore::interplab.dynamics.LLCConvergenceWarning")
def test_the_curve_carries_each_estimates_diagnostics_and_old_reports_still_open(run_dir):
    result = llc_along_run(run_dir, CFG, components=["L1H0"], n_seqs=4, seq_len=16, steps=[0, 6])
    for c in ("all", "L1H0"):
        for i, step in enumerate(result.steps):
            est = result.estimates[step][c]
            assert (result.rhat[c][i], result.ess_bulk[c][i], result.ess_tail[c][i]) == (
                est.rhat,
                est.ess_bulk,
                est.ess_tail,
            )
            assert math.isfinite(est.rhat)  # 2 chains x 6 draws: enough to compute, far too few to trust
    row = result.table()[0]
    assert {"all rhat", "all ess_bulk", "all ess_tail", "L1H0 rhat"} <= set(row)
    assert "R-hat all" in result.markdown() and "ESS bulk/tail L1H0" in result.markdown()
    assert "R-hat" in result.summary()
    # 2 chains x 6 draws have not mixed: starred in the table, listed, marked in the plot
    assert result.not_mixed() and " *" in result.markdown()
    assert any("R-hat >" in (t.name or "") for t in result.plot().data)
    back = RunLLC.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.rhat == result.rhat and back.ess_tail == result.ess_tail
    # a report.json written before the diagnostics existed: opens, with NaN R-hat and ESS
    old = {k: v for k, v in result.to_dict().items() if k not in ("rhat", "ess_bulk", "ess_tail")}
    legacy = RunLLC.from_dict(old)
    assert legacy.llc == result.llc and all(math.isnan(r) for r in legacy.rhat["all"])
    assert legacy.not_mixed() == [] and "R-hat unknown" in legacy.summary() and "n/a" in legacy.markdown()


@pytest.mark.filterwarnings("ignore::interplab.dynamics.LLCConvergenceWarning")
def test_old_checkpoint_files_resume_with_diagnostics_recomputed_from_their_traces(run_dir, monkeypatch):
    first = llc_along_run(run_dir, CFG, n_seqs=4, seq_len=16, steps=[0, 3])
    for step in (0, 3):  # strip the new fields, as a file written before them
        file = run_dir / runs.LLC / runs.LLC_ESTIMATES / f"{runs.checkpoint_name(step)}.json"
        doc = runs.read_json(file)
        for est in doc["estimates"].values():
            for k in ("rhat", "ess_bulk", "ess_tail"):
                est.pop(k)
        file.write_text(json.dumps(doc))
    with monkeypatch.context() as mp:
        mp.setattr(run_llc, "estimate_llc", lambda *a, **k: pytest.fail("resampled an old checkpoint file"))
        again = llc_along_run(run_dir, CFG, n_seqs=4, seq_len=16, steps=[0, 3])
    assert again.resumed == (0, 3)
    for a, b in zip(again.rhat["all"], first.rhat["all"], strict=True):
        assert a == pytest.approx(b, rel=1e-9)


def test_llc_command_prints_the_diagnostics_and_which_estimates_did_not_mix(run_dir):
    out = CliRunner().invoke(app, ["llc", str(run_dir), *ARGS, "--steps", "0,6"])
    assert out.exit_code == 0, out.output
    said = " ".join(out.stdout.split())
    assert "R-hat" in said and "ESS" in said
    assert "not mixed" in said and "--draws (now 6)" in said and "step 0 all" in said
    report = runs.read_json(run_dir / runs.LLC / runs.REPORT, runs.Kind.LLC)
    assert len(report["rhat"]["all"]) == 2 and all(r is None or r > 0 for r in report["rhat"]["all"])


def test_estimates_whose_chains_left_the_basin_are_named():
    """The chains' mean loss L(w*) + LLC / nbeta above ln(d_vocab) (a uniform guess's) flags an estimate of a
    checkpoint that is better than chance; one at chance is not judged; an old report (no bound) judges none."""
    curve = RunLLC(
        run_dir="run",
        steps=(0, 10, 20),
        components=("all", "L0H0"),
        llc={"all": (5.0, 50.0, 0.1), "L0H0": (1.0, 2.0, 0.1)},
        se={"all": (0.1,) * 3, "L0H0": (0.1,) * 3},
        init_loss=(2.0, 2.0, 7.0),
        config=SGLDConfig(nbeta=10.0),
        data={"n_seqs": 8, "seq_len": 4},
        chance_loss=math.log(1024),
    )
    assert [(s, c) for s, c, _ in curve.not_local()] == [(10, "all")]
    assert_close(curve.not_local()[0][2], 7.0)  # 2 + 50 / 10 > 6.93; step 20 starts above chance
    assert "for 1 of 6 estimates, worst 7.000 at step 10 (all)" in curve.summary()
    back = RunLLC.from_dict(json.loads(json.dumps(curve.to_dict())))
    assert back.not_local() == curve.not_local()
    old = curve.to_dict()
    del old["chance_loss"]
    assert RunLLC.from_dict(old).not_local() == [] and "basin" not in RunLLC.from_dict(old).summary()
    default = dataclasses.replace(curve, config=SGLDConfig())  # nbeta None: n / log n of the 8 sequences
    assert_close(default.nbeta, 8 / math.log(8))
    assert_close(default.sampled_loss("all", 1), 2.0 + 50.0 * math.log(8) / 8)


def test_llc_command_says_when_the_chains_left_the_basin(run_dir):
    out = CliRunner().invoke(
        app, ["llc", str(run_dir), *ARGS, "--steps", "6", "--nbeta", "0.001", "--step-size", "0.01"]
    )
    assert out.exit_code == 0, out.output
    said = " ".join(out.stdout.split())
    assert "left the checkpoint's basin" in said and "raise --nbeta (now 0.001;" in said
    assert "the loss is a mean over 64 tokens" in said and "--gamma (now 100)" in said
    report = runs.read_json(run_dir / runs.LLC / runs.REPORT, runs.Kind.LLC)
    d_vocab = load_native(runs.TrainRun.open(run_dir).checkpoints()[-1].path).cfg.d_vocab
    assert_close(report["chance_loss"], math.log(d_vocab))
