"""`interplab features ...` and `interplab serve` from the command line (thin wrappers over the library)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from interplab.features.reader import FeatureReader
from tests.features.planted import planted_sae

runner = CliRunner()


def _real_sae(d_in: int, d_sae: int, hook: str):
    sae_mod = pytest.importorskip("interplab.sae")
    if not hasattr(sae_mod, "load_sae"):
        pytest.skip("interplab.sae (the SAE module) is not merged into this checkout yet")
    from interplab.sae import SAEConfig, create_sae

    return create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu", hook_name=hook))


def test_build_export_explain_from_the_command_line(tmp_path, model, tokens):
    from safetensors.torch import save_file

    sae = _real_sae(32, 24, "blocks.0.hook_resid_post")
    model.save(tmp_path / "model")
    sae.save(tmp_path / "sae")
    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))
    args = [
        "features",
        "build",
        "--model",
        str(tmp_path / "model"),
        "--sae",
        str(tmp_path / "sae"),
        "--tokens",
        str(tmp_path / "tokens.safetensors"),
        "--out",
        str(tmp_path / "f.db"),
        "--top-k",
        "5",
        "--batch-size",
        "8",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "interplab serve --db" in r.output
    store = FeatureReader(tmp_path / "f.db")
    assert store.n_features() == 24 and store.meta()["n_tokens"] == tokens.numel()
    r = runner.invoke(
        app, ["features", "export", "--db", str(tmp_path / "f.db"), "--html", str(tmp_path / "site")]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "site" / "feature" / "0.html").is_file()
    r = runner.invoke(
        app,
        [
            "features",
            "steer",
            "--model",
            str(tmp_path / "model"),
            "--sae",
            str(tmp_path / "sae"),
            "--feature",
            "1",
            "--value",
            "0",
            "--prompt",
            "1 2 3",
            "--max-new-tokens",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output.count("#") >= 6
    steer = ["features", "steer", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae")]
    steer += ["--feature", "1", "--prompt", "1 2 3", "--max-new-tokens", "3"]
    r = runner.invoke(app, [*steer, "--db", str(tmp_path / "f.db"), "--strength", "1.5"])
    assert r.exit_code == 0 and "add 1.5x max activation" in r.output, r.output
    r = runner.invoke(app, steer)  # a relative strength needs the database's max activation
    assert r.exit_code != 0 and "--db" in r.output


def test_sae_on_a_mismatched_site_is_refused(tmp_path, model, tokens):
    from safetensors.torch import save_file

    sae = _real_sae(48, 8, "blocks.0.hook_resid_post")
    model.save(tmp_path / "model")
    sae.save(tmp_path / "sae")
    save_file({"tokens": tokens}, str(tmp_path / "t.safetensors"))
    r = runner.invoke(
        app,
        [
            "features",
            "build",
            "--model",
            str(tmp_path / "model"),
            "--sae",
            str(tmp_path / "sae"),
            "--tokens",
            str(tmp_path / "t.safetensors"),
            "--out",
            str(tmp_path / "f.db"),
        ],
    )
    assert r.exit_code == 2
    assert "d_in=48" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "f.db").exists() or FeatureReader(tmp_path / "f.db").n_features() == 0


def test_explain_and_missing_database(tmp_path, model, tokens):
    build_feature_db(
        tmp_path / "f.db",
        model,
        planted_sae(model, 4),
        tokens,
        FeatureBuildConfig(top_k=4, window_left=2, batch_size=8),
    )
    r = runner.invoke(app, ["features", "explain", "--db", str(tmp_path / "f.db"), "--k", "1"])
    assert r.exit_code == 0, r.output
    assert "explained 4 features (mean score 1.000)" in r.output
    r = runner.invoke(
        app, ["features", "export", "--db", str(tmp_path / "none.db"), "--html", str(tmp_path / "s")]
    )
    assert r.exit_code == 2 and "no feature database" in r.output
    r = runner.invoke(app, ["serve", "--db", str(tmp_path / "none.db")])
    assert r.exit_code == 2 and "no feature database" in r.output


def test_build_into_a_folder_that_does_not_exist_yet(tmp_path, model, tokens):
    """``--out new/dir/f.db`` makes its folder (it failed with an OperationalError reported as a bug)."""
    out = tmp_path / "new" / "dir" / "f.db"
    build_feature_db(out, model, planted_sae(model, 4), tokens, FeatureBuildConfig(top_k=2, batch_size=8))
    assert FeatureReader(out).n_features() == 4


def _run_with_two_saes(tmp_path, model):
    """A training run as the demo lays it out: config.json, final/, and sae/ (an SAE training run, 2 SAEs)."""
    from interplab.runs import CONFIG, FINAL, SAE_DIR, SAES, Kind, write_json

    run = tmp_path / "run"
    train = {"model": {}, "data": {}, "optim": {}, "steps": 1, "batch_size": 1}
    write_json(run / CONFIG, Kind.TRAIN, train)
    model.save(run / FINAL)
    write_json(run / SAE_DIR / CONFIG, Kind.SAE_TRAIN, {"saes": {}, "train": {}, "data": {}})
    for name, d_sae in (("a", 24), ("b", 16)):
        _real_sae(32, d_sae, "blocks.0.hook_resid_post").save(run / SAE_DIR / SAES / name)
    return run


def test_build_finds_the_sae_inside_a_run_and_asks_which_when_there_are_several(tmp_path, model, tokens):
    from safetensors.torch import save_file

    run = _run_with_two_saes(tmp_path, model)
    save_file({"tokens": tokens}, str(tmp_path / "t.safetensors"))
    args = ["features", "build", "--model", str(run / "final"), "--tokens", str(tmp_path / "t.safetensors")]
    args += ["--top-k", "3", "--batch-size", "8"]
    r = runner.invoke(app, [*args, "--sae", str(run / "sae"), "--out", str(tmp_path / "x.db")])
    assert r.exit_code == 2 and "holds 2 SAEs (a, b)" in r.output, r.output
    assert f"--sae {run / 'sae'} --name NAME" in r.output and str(run / "sae" / "saes" / "a") in r.output
    assert not (tmp_path / "x.db").exists()
    r = runner.invoke(app, [*args, "--sae", str(run / "sae"), "--name", "c", "--out", str(tmp_path / "x.db")])
    assert r.exit_code == 2 and "no SAE named 'c'" in r.output and "a, b" in r.output, r.output
    for sae_arg, name, n in ((run / "sae", "b", 16), (run, "a", 24)):  # the SAE run, or the training run
        db = tmp_path / f"{name}.db"
        r = runner.invoke(app, [*args, "--sae", str(sae_arg), "--name", name, "--out", str(db)])
        assert r.exit_code == 0, r.output
        meta = FeatureReader(db).meta()
        assert FeatureReader(db).n_features() == n
        assert meta["sae_path"] == str((run / "sae" / "saes" / name).resolve())


@pytest.mark.skipif(
    "runs" not in vars(__import__("interplab.model.load").model.load),
    reason="load_model reads a training run (its final/) once the runs branch is merged",
)
def test_build_and_steer_take_a_training_run_as_the_model(tmp_path, model, tokens):
    from safetensors.torch import save_file

    run = _run_with_two_saes(tmp_path, model)
    save_file({"tokens": tokens}, str(tmp_path / "t.safetensors"))
    args = ["features", "build", "--model", str(run), "--sae", str(run), "--name", "b"]
    args += ["--tokens", str(tmp_path / "t.safetensors"), "--top-k", "3", "--out", str(tmp_path / "f.db")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert FeatureReader(tmp_path / "f.db").n_features() == 16
    steer = ["features", "steer", "--model", str(run), "--sae", str(run), "--name", "b", "--feature", "1"]
    r = runner.invoke(app, [*steer, "--value", "0", "--prompt", "1 2 3", "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output


def test_build_window_option_sets_the_stored_context_length(tmp_path, model, tokens):
    """``--window 9,3`` stores windows of 9 + 1 + 3 tokens around each peak (the meta and every top context
    say so); a malformed value is refused naming it."""
    from safetensors.torch import save_file

    sae = _real_sae(32, 8, "blocks.0.hook_resid_post")
    model.save(tmp_path / "model")
    sae.save(tmp_path / "sae")
    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))
    args = ["features", "build", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"),
            "--tokens", str(tmp_path / "tokens.safetensors"), "--out", str(tmp_path / "w.db"), "--no-loss-effect"]  # fmt: skip
    r = runner.invoke(app, [*args, "--window", "9,3"])
    assert r.exit_code == 0, r.output
    with FeatureReader(tmp_path / "w.db") as store:
        assert store.meta()["window_left"] == 9
        f = next(row["feature"] for row in store.list_features(limit=8) if row["density"] > 0)
        assert {len(c["tokens"]) for c in store.feature(f)["top"]} == {13}
    bad = runner.invoke(app, [*args, "--window", "9"])
    assert bad.exit_code != 0 and "--window '9'" in bad.output and "LEFT,RIGHT" in bad.output
