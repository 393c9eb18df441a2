"""SAE training runs resume bit-exactly, refuse a folder holding another run, and never repeat log lines."""

import json
import shutil

import pytest
import torch

from interplab.sae import SAEConfig, create_sae, load_sae
from interplab.sae.recovery import SyntheticFeatures
from interplab.sae.train import SAETrainConfig, train_saes
from interplab.train.checkpoint import list_checkpoints

HOOK = "blocks.0.hook_resid_post"
STEPS = 24


class _Killed(Exception):
    pass


def _batches(kill_after=None):
    for i, b in enumerate(SyntheticFeatures(n_features=24, d=12).batches(48, STEPS + 2, key=HOOK, seed=3)):
        if i == kill_after:
            raise _Killed  # as SIGKILL would: mid-run, after the log got rows past the last checkpoint
        yield b


def _saes(seed):
    """Two SAEs trained jointly: TopK (AuxK for dead latents) and ReLU (resampling), from seed ``seed``."""
    torch.manual_seed(seed)
    return {
        "topk": create_sae(SAEConfig(d_in=12, d_sae=48, architecture="topk", k=3, hook_name=HOOK)),
        "relu": create_sae(SAEConfig(d_in=12, d_sae=48, architecture="relu", hook_name=HOOK)),
    }


def _cfgs(**changes):
    # log_every, stats_every and checkpoint_every do not divide each other, so the logged sums, the firing
    # counters and the resampling generator are all mid-window at a checkpoint; latents die and get
    # resampled within the run
    base = dict(
        total_steps=STEPS,
        lr=3e-3,
        warmup_steps=3,
        log_every=5,
        stats_every=3,
        checkpoint_every=7,
        dead_after_tokens=96,
        resample_every=4,
        coefficient=0.3,
        coefficient_warmup_steps=4,
        autocast=False,
    )
    return {"topk": SAETrainConfig(**base), "relu": SAETrainConfig(**{**base, **changes})}


def _metric_rows(run):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "sae" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    result = train_saes(_saes(0), _batches(), _cfgs(), run_dir=run)
    return run, result


def _assert_same_run(a, b):
    assert _metric_rows(a) == _metric_rows(b)
    for name in ("topk", "relu"):
        for file in ("sae_weights.safetensors", "cfg.json"):
            assert (a / "saes" / name / file).read_bytes() == (b / "saes" / name / file).read_bytes()
        sa, sb = load_sae(a / "saes" / name), load_sae(b / "saes" / name)
        for (n, p), q in zip(sa.state_dict().items(), sb.state_dict().values(), strict=True):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("stop", [7, 10, 14])
def test_stop_and_resume_is_bit_identical(straight, tmp_path, stop):
    run = tmp_path / "run"
    half = train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, stop_after=stop)
    assert half.steps == stop and not (run / "saes").exists()  # unfinished SAEs are not published
    # resumed SAEs start from other weights: everything must come from the checkpoint
    resumed = train_saes(_saes(99), _batches(), _cfgs(), run_dir=run)
    assert resumed.steps == STEPS and resumed.tokens == straight[1].tokens
    _assert_same_run(straight[0], run)
    assert resumed.history == straight[1].history
    events = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "event" in r]
    assert events == [{"event": "resume", "step": stop}]


def test_killed_run_resumes_bit_identically_and_the_log_has_each_step_once(straight, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        train_saes(_saes(0), _batches(kill_after=18), _cfgs(), run_dir=run)
    steps = [r["step"] for r in _metric_rows(run)]
    assert max(steps) == 15 and [c.step for c in list_checkpoints(run)] == [7, 14]  # rows past the checkpoint
    train_saes(_saes(5), _batches(), _cfgs(), run_dir=run)
    _assert_same_run(straight[0], run)
    rows = _metric_rows(run)
    assert len(rows) == len({(r["sae"], r["step"]) for r in rows})


def test_corrupt_newest_checkpoint_falls_back_and_says_so(straight, tmp_path):
    run = tmp_path / "run"
    train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, stop_after=20)
    newest = list_checkpoints(run)[-1]
    assert newest.step == 20
    state = newest.path / "relu" / "trainer.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0x01
    state.write_bytes(bytes(data))
    train_saes(_saes(1), _batches(), _cfgs(), run_dir=run)
    _assert_same_run(straight[0], run)
    events = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "event" in r]
    assert (
        events[0]["event"] == "skipped_checkpoint"
        and "step_000020: relu/trainer.safetensors" in (events[0]["reason"])
    )
    assert events[1] == {"event": "resume", "step": 14}


def test_finished_run_rerun_changes_nothing(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    again = train_saes(_saes(3), _batches(), _cfgs(), run_dir=run)
    assert again.steps == STEPS
    _assert_same_run(straight[0], run)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda: (_saes(0), _cfgs(lr=1e-3)), "train.relu.lr=0.003, this run asks for 0.001"),
        (lambda: (_saes(0), {**_cfgs(), "topk": SAETrainConfig(total_steps=20)}), "train.topk"),
        (
            lambda: (
                {**_saes(0), "relu": create_sae(SAEConfig(d_in=12, d_sae=96, hook_name=HOOK))},
                _cfgs(),
            ),
            "saes.relu.d_sae=48, this run asks for 96",
        ),
        (lambda: ({"topk": _saes(0)["topk"]}, {"topk": _cfgs()["topk"]}), "saes.relu"),
    ],
)
def test_a_different_run_into_the_same_folder_is_refused(tmp_path, change, named):
    run = tmp_path / "run"
    train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, stop_after=7)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    saes, cfgs = change()
    with pytest.raises(ValueError, match=rf"was written by another run \({named}"):
        train_saes(saes, _batches(), cfgs, run_dir=run)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing touched
    result = train_saes(saes, _batches(), cfgs, run_dir=run, overwrite=True)
    assert result.steps == max(c.total_steps for c in cfgs.values())
    assert {r["sae"] for r in _metric_rows(run)} == set(saes)
    assert all(c.step != 7 or c.path.exists() for c in list_checkpoints(run))
    assert sorted(p.name for p in (run / "saes").iterdir()) == sorted(saes)


def test_other_data_is_a_different_run(tmp_path):
    run = tmp_path / "run"
    train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, stop_after=7, data={"cache": "a", "rows": 10})
    with pytest.raises(ValueError, match='data.cache="a", this run asks for "b"'):
        train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, data={"cache": "b", "rows": 10})


def test_resume_off_refuses_an_existing_run_and_foreign_folders_are_never_touched(tmp_path):
    run = tmp_path / "run"
    train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, stop_after=7)
    with pytest.raises(ValueError, match="already holds this run and resume is off"):
        train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, resume=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"kind": "something else"}')
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="does not hold an SAE training run"):
            train_saes(_saes(0), _batches(), _cfgs(), run_dir=tmp_path / "mine", overwrite=overwrite)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["config.json"]


def test_keep_checkpoints_prunes_the_oldest(tmp_path):
    run = tmp_path / "run"
    train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, keep_checkpoints=2)
    assert [c.step for c in list_checkpoints(run)] == [21, 24]


def test_a_run_with_old_checkpoint_names_and_no_kinds_resumes(straight, tmp_path):
    """Folders of earlier versions: 8-digit checkpoint names (``step_00000007``) and a train_summary without
    ``kind``; the run resumes from that checkpoint bit-exactly and `SAERun` reads it."""
    from interplab.runs import Kind, SAERun, checkpoint_name, detect_document

    run = tmp_path / "run"
    train_saes(_saes(0), _batches(), _cfgs(), run_dir=run, stop_after=7)
    (run / "checkpoints" / checkpoint_name(7)).rename(run / "checkpoints" / "step_00000007")
    train_saes(_saes(99), _batches(), _cfgs(), run_dir=run)
    _assert_same_run(straight[0], run)
    assert sorted(SAERun.open(run).saes) == ["relu", "topk"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["kind"] == Kind.SAE_TRAIN_SUMMARY.value and isinstance(summary["version"], int)
    legacy = {k: v for k, v in summary.items() if k not in ("kind", "version")}
    assert detect_document("train_summary.json", legacy) is Kind.SAE_TRAIN_SUMMARY
