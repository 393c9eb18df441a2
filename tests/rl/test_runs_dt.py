"""The run contract of the decision-transformer folders: kinds, detection, the typed openers and the errors
they raise for a folder of another kind."""

from __future__ import annotations

import pytest

from interplab import runs
from interplab.runs import Kind


def _dt_train(root):
    run = root / "train"
    runs.write_json(run / runs.CONFIG, Kind.DT_TRAIN, {"model": {"env": "MiniGrid-MemoryS7-v0"}, "train": {}})
    return run


def _dt_model(folder):
    runs.write_json(folder / runs.CONFIG, Kind.DT_MODEL, {"env": "MiniGrid-MemoryS7-v0", "d_model": 8})
    (folder / runs.MODEL_WEIGHTS).write_bytes(b"")
    return folder


def test_detect_and_open_every_dt_kind(tmp_path):
    data = tmp_path / "data"
    runs.write_json(data / runs.MANIFEST, Kind.TRAJECTORIES, {"env": "MiniGrid-MemoryS7-v0", "shards": []})
    (data / runs.shard_name(1)).write_bytes(b"")
    (data / runs.shard_name(0)).write_bytes(b"")
    assert runs.detect(data) is Kind.TRAJECTORIES
    t = runs.open_run(data)
    assert isinstance(t, runs.TrajectoriesDir) and t.env == "MiniGrid-MemoryS7-v0"
    assert [p.name for p in t.shards] == ["shard_00000.safetensors", "shard_00001.safetensors"]

    run = _dt_train(tmp_path)
    assert runs.detect(run) is Kind.DT_TRAIN
    assert runs.describe(run) == "a decision-transformer training run (0 checkpoints, no final/ yet)"
    with pytest.raises(runs.RunError, match="no final/ yet: resume it"):
        runs.dt_model_folder(run)
    _dt_model(run / runs.FINAL)
    opened = runs.open_run(run)
    assert isinstance(opened, runs.DTTrainRun) and opened.config["model"]["env"] == "MiniGrid-MemoryS7-v0"
    assert opened.final == run / runs.FINAL and runs.dt_model_folder(run) == run / runs.FINAL
    assert runs.detect(run / runs.FINAL) is Kind.DT_MODEL
    assert isinstance(runs.open_run(run / runs.FINAL), runs.DTModelDir)
    assert runs.dt_model_folder(run / runs.FINAL) == run / runs.FINAL

    ev = tmp_path / "eval"
    runs.write_json(ev / runs.CALIBRATION_JSON, Kind.DT_EVAL, {"env": "MiniGrid-MemoryS7-v0", "targets": []})
    assert runs.detect(ev) is Kind.DT_EVAL
    opened_eval = runs.open_run(ev)
    assert isinstance(opened_eval, runs.DTEvalRun) and opened_eval.rollouts is None
    runs.write_json(ev / runs.ROLLOUTS / runs.MANIFEST, Kind.TRAJECTORIES, {"env": "x", "shards": []})
    assert runs.DTEvalRun.open(ev).rollouts == ev / runs.ROLLOUTS
    assert runs.DTEvalRun.open(ev / runs.CALIBRATION_JSON).path == ev

    an = tmp_path / "analysis"
    runs.write_json(an / runs.REPORT, Kind.DT_ANALYSIS, {"probe_accuracy": 1.0})
    assert runs.detect(an) is Kind.DT_ANALYSIS
    rep = runs.open_run(an)
    assert isinstance(rep, runs.Report) and rep.kind is Kind.DT_ANALYSIS


def test_dt_openers_say_what_a_folder_is(tmp_path):
    run = _dt_train(tmp_path)
    data = tmp_path / "data"
    runs.write_json(data / runs.MANIFEST, Kind.TRAJECTORIES, {"env": "MiniGrid-MemoryS7-v0", "shards": []})
    with pytest.raises(runs.RunError, match="is a decision-transformer training run .*expected a trajectory"):
        runs.TrajectoriesDir.open(run)
    with pytest.raises(runs.RunError, match="is a trajectory data set; expected a decision transformer"):
        runs.dt_model_folder(data)
    with pytest.raises(runs.RunError, match="is missing .*expected a decision-transformer evaluation"):
        runs.DTEvalRun.open(tmp_path / "nowhere")
    with pytest.raises(runs.RunError, match="choose another output folder"):
        runs.check_out(data, Kind.DT_TRAIN)
    assert runs.check_out(run, Kind.DT_TRAIN) == run
