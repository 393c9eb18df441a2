"""`interplab sae cache|train|eval` end to end on a tiny model with a character tokenizer."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.data import CharTokenizer
from interplab.model import ModelConfig, Transformer

runner = CliRunner()
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    tok = CharTokenizer("abcdefgh \n")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=tok.vocab_size, n_ctx=64, d_mlp=32)
    )
    model.tokenizer = tok
    model.save(tmp_path / "model")
    rng = random.Random(0)
    (tmp_path / "corpus").mkdir()
    for i in range(20):  # a folder of files: the corpus splits train/validation by file
        text = "\n".join("".join(rng.choice("abcdefgh ") for _ in range(200)) for _ in range(8))
        (tmp_path / "corpus" / f"{i}.txt").write_text(text)
    return tmp_path


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def test_cache_train_eval(setup):
    t = setup
    corpus = ["--corpus", str(t / "corpus")]
    out = _ok(
        [
            "sae",
            "cache",
            str(t / "model"),
            "--hook",
            HOOK,
            "--out",
            str(t / "acts"),
            "--tokens",
            "3000",
            "--seq-len",
            "32",
            "--batch",
            "8",
            "--shard-rows",
            "1000",
            *corpus,
        ]
    )
    assert "rows in" in out
    manifest = json.loads((t / "acts" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == "bfloat16" and len(manifest["shards"]) >= 3
    _ok(
        [
            "sae",
            "train",
            "--cache",
            str(t / "acts"),
            "--hook",
            HOOK,
            "--out",
            str(t / "run"),
            "--steps",
            "20",
            "--batch",
            "128",
            "--expansion",
            "4",
            "--k",
            "4",
            "--sweep",
            "k=2,4",
        ]
    )
    names = sorted(p.name for p in (t / "run" / "saes").iterdir())
    assert names == ["blocks_0_hook_resid_post__k_2", "blocks_0_hook_resid_post__k_4"]
    log = [json.loads(line) for line in (t / "run" / "log.jsonl").read_text().splitlines()]
    assert {r["sae"] for r in log} == set(names) and log[-1]["step"] == 20
    out = _ok(
        [
            "sae",
            "eval",
            str(t / "run"),
            "--model",
            str(t / "model"),
            "--batches",
            "2",
            "--seq-len",
            "32",
            "--split",
            "train",
            *corpus,
        ]
    )
    report = json.loads((t / "run" / "eval" / "report.json").read_text())
    assert [p["name"] for p in report["saes"]] == names
    assert report["kind"] == "sae_eval" and isinstance(report["version"], int)  # the run contract
    for name in names:
        assert json.loads((t / "run" / "eval" / name / "report.json").read_text())["kind"] == "sae_eval"
    assert json.loads((t / "run" / "config.json").read_text())["kind"] == "sae_train"
    assert all(0 <= p["l0"] <= 4 for p in report["saes"])
    assert (t / "run" / "eval" / "frontier_fvu.html").exists()


def test_train_streaming_from_the_model(setup):
    t = setup
    _ok(
        [
            "sae",
            "train",
            "--model",
            str(t / "model"),
            "--hook",
            HOOK,
            "--out",
            str(t / "run"),
            "--steps",
            "5",
            "--batch",
            "64",
            "--arch",
            "relu",
            "--seq-len",
            "32",
            "--corpus",
            str(t / "corpus"),
        ]
    )
    assert (t / "run" / "saes" / "blocks_0_hook_resid_post" / "cfg.json").exists()


def test_clear_errors(setup):
    t = setup
    res = runner.invoke(app, ["sae", "train", "--out", str(t / "r"), "--hook", HOOK, "--steps", "1"])
    assert res.exit_code != 0 and "exactly one of --model" in res.output
    res = runner.invoke(
        app,
        [
            "sae",
            "cache",
            str(t / "model"),
            "--hook",
            "blocks.7.hook_resid_post",
            "--out",
            str(t / "a"),
            "--corpus",
            str(t / "corpus"),
        ],
    )
    assert res.exit_code != 0 and "blocks.7" in res.output


def _cache_args(t, out, *extra):
    return [
        "sae",
        "cache",
        str(t / "model"),
        "--hook",
        HOOK,
        "--out",
        str(t / out),
        "--tokens",
        "2000",
        "--batch",
        "8",
        "--shard-rows",
        "500",
        "--corpus",
        str(t / "corpus"),
        *extra,
    ]


def test_cache_resume_with_other_settings_is_refused_naming_them(setup):
    t = setup
    _ok(_cache_args(t, "acts", "--seq-len", "32"))
    manifest = json.loads((t / "acts" / "manifest.json").read_text())
    assert manifest["model"]["name"] == str(t / "model")
    assert manifest["identity"]["source.seq_len"] == 32 and manifest["identity"]["source.split"] == "train"
    for extra, named in (
        (["--seq-len", "16"], "seq_len=32; this run asks for 16"),
        (["--seq-len", "32", "--batch", "4"], "batch_size=8; this run asks for 4"),
        (["--seq-len", "32", "--dtype", "float16"], "dtype=bfloat16; this run asks for float16"),
    ):
        res = runner.invoke(app, _cache_args(t, "acts", *extra))
        said = " ".join(res.output.split())
        assert res.exit_code != 0 and named in said and "--overwrite" in said, said
        assert json.loads((t / "acts" / "manifest.json").read_text()) == manifest
    torch.manual_seed(1)
    tok = CharTokenizer("abcdefgh \n")
    other = Transformer(
        ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=tok.vocab_size, n_ctx=64, d_mlp=32)
    )
    other.tokenizer = tok
    other.save(t / "model")  # the same path now holds other weights
    res = runner.invoke(app, _cache_args(t, "acts", "--seq-len", "32"))
    assert res.exit_code != 0 and "model weights" in " ".join(res.output.split())
    _ok(_cache_args(t, "acts", "--seq-len", "16", "--overwrite"))
    assert json.loads((t / "acts" / "manifest.json").read_text())["identity"]["source.seq_len"] == 16


def _train_args(t, out, *extra):
    return [
        "sae",
        "train",
        "--cache",
        str(t / "acts"),
        "--hook",
        HOOK,
        "--out",
        str(t / out),
        "--steps",
        "16",
        "--batch",
        "64",
        "--expansion",
        "2",
        "--k",
        "4",
        "--checkpoint-every",
        "5",
        "--fp32",
        *extra,
    ]


def test_train_stop_and_resume_equals_one_run_and_other_runs_are_refused(setup):
    t = setup
    _ok(_cache_args(t, "acts", "--seq-len", "32"))
    _ok(_train_args(t, "straight"))
    out = _ok(_train_args(t, "run", "--stop-after", "7"))
    assert "run the same command again to resume" in out and not (t / "run" / "saes").exists()
    assert "resumed from step 7" in _ok(_train_args(t, "run"))  # stop_after writes a checkpoint
    name = "blocks_0_hook_resid_post"
    for file in ("sae_weights.safetensors", "cfg.json"):
        assert (t / "run" / "saes" / name / file).read_bytes() == (
            t / "straight" / "saes" / name / file
        ).read_bytes()

    def rows(run):
        lines = (t / run / "log.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "sae" in r]

    assert rows("run") == rows("straight") and [r["step"] for r in rows("run")][-1] == 16
    saved = (t / "run" / "saes" / name / "sae_weights.safetensors").read_bytes()
    said = " ".join(runner.invoke(app, _train_args(t, "run", "--lr", "1e-3")).output.split())
    assert "another run" in said and "lr=0.0003, this run asks for 0.001" in said, said
    said = " ".join(runner.invoke(app, _train_args(t, "run", "--seed", "1")).output.split())
    assert "another run" in said and "seed" in said, said
    assert (t / "run" / "saes" / name / "sae_weights.safetensors").read_bytes() == saved
    _ok(_train_args(t, "run", "--lr", "1e-3", "--overwrite"))
    assert rows("run")[0]["lr"] != rows("straight")[0]["lr"]
    assert len(rows("run")) == len(rows("straight"))
