import pytest
import torch
from typer.testing import CliRunner

from interplab.model import ModelConfig
from interplab.train import CheckpointConfig, TrainConfig, load_preset, preset_names


def test_presets_load_and_round_trip(tmp_path):
    assert {"induction-2l", "induction-classic", "code-4l"} <= set(preset_names())
    for name in preset_names():
        cfg = load_preset(name)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
        cfg.to_json(tmp_path / f"{name}.json")
        assert TrainConfig.from_file(tmp_path / f"{name}.json") == cfg
    demo = load_preset("induction-2l")
    assert demo.model.smear_keys and demo.model.attn_only and demo.model.positional.value == "rotary"
    assert (demo.model.d_model, demo.model.n_heads, demo.data.vocab_size, demo.model.n_ctx) == (
        128,
        4,
        1024,
        256,
    )
    assert not load_preset("induction-classic").model.smear_keys


def test_yaml_config_and_overrides(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(
        "model: {d_model: 32, n_layers: 1, n_heads: 2, d_vocab: 300, n_ctx: 64}\n"
        "data: {source: python-stdlib, seq_len: 64}\nsteps: 10\n"
    )
    cfg = TrainConfig.from_file(file)
    assert cfg.steps == 10 and cfg.data.seq_len == 64
    changed = cfg.override(["optim.lr=1e-4", "model.n_layers=3", "precision=bf16"])
    assert (changed.optim.lr, changed.model.n_layers, changed.precision.value) == (1e-4, 3, "bf16")
    with pytest.raises(ValueError, match="unknown setting 'optim.lrr'"):
        cfg.override(["optim.lrr=1"])
    with pytest.raises(ValueError, match="must look like key=value"):
        cfg.override(["steps"])


def test_bad_configs():
    model = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_vocab=300, n_ctx=64)
    with pytest.raises(ValueError, match="data.seq_len=128 is longer than the model's n_ctx=64"):
        TrainConfig(model=model, data={"seq_len": 128})
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by grad_accum=4"):
        TrainConfig(model=model, data={"seq_len": 64}, batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="precision='fp8'"):
        TrainConfig(model=model, data={"seq_len": 64}, precision="fp8")
    with pytest.raises(ValueError, match=r"unknown data settings \['sequence_length'\]"):
        TrainConfig.from_dict({"model": model.to_dict(), "data": {"sequence_length": 3}})
    with pytest.raises(ValueError, match="unknown preset 'nope'; valid presets: .*induction-2l"):
        load_preset("nope")


def test_checkpoint_schedule_is_dense_early():
    steps = CheckpointConfig(log_spaced=30, every=100).steps(1500)
    assert steps[0] == 0 and steps[-1] == 1500
    assert sum(s <= 100 for s in steps) > sum(100 < s <= 200 for s in steps) * 3  # dense early
    assert set(range(100, 1501, 100)) <= set(steps)
    assert CheckpointConfig(log_spaced=0).steps(50) == [0, 50]


def test_cli_errors(tmp_path):
    from interplab.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--preset", "nope"])
    assert result.exit_code == 2 and "unknown preset 'nope'" in result.output
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["train", "--preset", "induction-2l", "--set", "data.seq_len=512"])
    assert result.exit_code == 2 and "longer than the model's n_ctx=256" in result.output
    result = runner.invoke(app, ["formation", str(tmp_path)])
    assert result.exit_code == 2 and "is not a training run" in result.output
    result = runner.invoke(app, ["train", "--list"])
    assert "induction-2l" in result.output


def test_cli_train_reports_empty_corpus(tmp_path, monkeypatch):
    from interplab.cli.main import app

    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--preset",
            "induction-2l",
            "--set",
            f"data.source={tmp_path / 'empty'}",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2 and "empty corpus" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["parens", "ioi", "modadd"])
def test_task_presets_train_and_resume(tmp_path, name):
    from safetensors.torch import load_file

    from interplab.train import read_log, train

    cfg = load_preset(name).override(
        ["steps=4", "batch_size=8", "eval_batches=1", "checkpoints.log_spaced=2"]
    )
    assert cfg.model is None and cfg.data.task == name
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b", stop_after=2)
    result = train(cfg, tmp_path / "b")
    assert result.resumed_from == 2
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = read_log(tmp_path / "a")[-1]
    assert "val_accuracy" in last and last["step"] == 4
