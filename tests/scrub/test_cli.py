"""The scrub and discover commands write their run folders and fail clearly."""

import json

from typer.testing import CliRunner

from interplab.cli.main import app

runner = CliRunner()


def test_scrub_command_writes_reports(tmp_path):
    hyp = tmp_path / "h.py"
    hyp.write_text(
        "from interplab.scrub.induction import induction_steps\nhypotheses = induction_steps()[:2]\n"
    )
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "scrub",
            str(hyp),
            "--model",
            "planted-induction",
            "--task",
            "induction",
            "--out",
            str(out),
            "--n-examples",
            "200",
            "--seeds",
            "1",
            "--no-per-claim",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "loss recovered" in res.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(e["recovered"] > 0.95 for e in log)
    report = json.loads((out / log[0]["folder"] / "report.json").read_text())
    assert report["kind"] == "scrub" and report["n_examples"] == 200
    assert (out / log[0]["folder"] / "report.html").read_text().startswith("<!doctype html>")


def test_scrub_command_names_a_bad_claim(tmp_path):
    hyp = tmp_path / "bad.py"
    hyp.write_text(
        "from interplab.scrub import Claim, Hypothesis\n"
        "hypothesis = Hypothesis(Claim('logits', children=[Claim('a5.0')]))\n"
    )
    res = runner.invoke(
        app,
        [
            "scrub",
            str(hyp),
            "--model",
            "planted-induction",
            "--task",
            "induction",
            "--out",
            str(tmp_path / "r"),
            "--n-examples",
            "50",
            "--seeds",
            "1",
        ],
    )
    assert res.exit_code == 2
    assert "a5.0" in res.output


def test_discover_command_acdc(tmp_path):
    out = tmp_path / "d"
    res = runner.invoke(
        app,
        [
            "discover",
            "--model",
            "planted-induction",
            "--task",
            "induction",
            "--method",
            "acdc",
            "--threshold",
            "0.1",
            "--n",
            "100",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["edges"]) == {
        "embed->a0.0.v",
        "a0.0->a1.0.k",
        "embed->a1.0.q",
        "embed->a1.0.v",
        "a1.0->logits",
    }
    assert "<svg" in (out / "report.html").read_text()


def test_discover_command_unknown_task(tmp_path):
    res = runner.invoke(
        app, ["discover", "--model", "planted-induction", "--task", "ioi", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2
    assert "unknown task 'ioi'" in res.output
