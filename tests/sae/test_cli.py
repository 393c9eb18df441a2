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
