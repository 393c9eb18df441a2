import json

import torch
from typer.testing import CliRunner

from interplab.cli.main import app
from tests.analysis.conftest import make_model
from tests.analysis.handbuilt import induction_model

runner = CliRunner()


def _prompts(path, n=3, length=6):
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(n):
            clean = torch.randint(0, 50, (length,), generator=g).tolist()
            corrupted = torch.randint(0, 50, (length,), generator=g).tolist()
            f.write(json.dumps({"clean": clean, "corrupted": corrupted, "answer": 3, "wrong": 4}) + "\n")
    return path


def test_patch_command_writes_a_run_folder(tmp_path):
    make_model().save(tmp_path / "model")
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "patch",
            str(tmp_path / "model"),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--target",
            "z",
            "--by-position",
            "--attribution",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert -1 <= report["attribution"]["correlation"] <= 1
    result = json.loads((out / "patch_z.json").read_text())
    assert result["dims"] == ["layer", "pos", "head"]
    for name in ("config.json", "log.jsonl", "patch_z.html", "attribution_z.html", "comparison.html"):
        assert (out / name).is_file(), name
    bad = runner.invoke(
        app,
        ["patch", str(tmp_path / "model"), "--prompts", str(prompts), "--out", str(out), "--target", "resid"],
    )
    assert bad.exit_code != 0 and "unknown patch target 'resid'" in bad.output


def test_heads_and_lens_commands(tmp_path):
    induction_model().save(tmp_path / "induction")
    res = runner.invoke(
        app, ["heads", str(tmp_path / "induction"), "--out", str(tmp_path / "heads"), "--seq-len", "10"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "heads" / "report.json").read_text())
    assert report["top"]["induction"][0][:2] == [1, 0]
    assert report["top"]["previous_token"][0][:2] == [0, 0]
    assert (tmp_path / "heads" / "attention_L1.html").is_file()

    make_model().save(tmp_path / "model")
    prompts = _prompts(tmp_path / "p.jsonl")
    res = runner.invoke(
        app, ["lens", str(tmp_path / "model"), "--prompts", str(prompts), "--out", str(tmp_path / "lens")]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "lens" / "report.json").read_text())
    assert abs(report["dla"]["total"] - report["dla"]["sum_of_components"]) < 1e-4
    assert (tmp_path / "lens" / "dla.html").is_file() and (tmp_path / "lens" / "logit_lens.json").is_file()


def test_patch_needs_pairs(tmp_path):
    make_model().save(tmp_path / "model")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": [1, 2, 3]}) + "\n")
    res = runner.invoke(
        app,
        [
            "patch",
            str(tmp_path / "model"),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code != 0 and "clean/corrupted pairs" in res.output
