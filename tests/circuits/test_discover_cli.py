"""``interplab discover --method eap-ig`` writes the circuit, MIB's metrics and their plot."""

import json

from typer.testing import CliRunner

from interplab.circuits.metrics import CircuitMetrics
from interplab.circuits.planted import PLANTED_EDGES
from interplab.cli.main import app

runner = CliRunner()


def test_discover_eap_ig_writes_metrics(tmp_path):
    out = tmp_path / "d"
    res = runner.invoke(
        app,
        ["discover", "--model", "planted-induction", "--task", "induction", "--method", "eap-ig"]
        + ["--n", "100", "--k", "5", "--steps", "3", "--sizes", "0.05,0.2,1", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["edges"]) == set(PLANTED_EDGES)
    assert report["method"] == "eap-ig" and report["details"]["steps"] == 3
    metrics = CircuitMetrics.load(out)
    assert metrics.curves["absolute"].fractions == (0.05, 0.2, 1.0)
    assert metrics.curves["absolute"].faithfulness[1] > 0.99  # 8 edges hold the planted 5
    assert (out / "metrics.html").is_file()
    # the console wraps long paths (a pytest-xdist worker's temp folder is longer): compare without the breaks
    assert str(out / "metrics.json") in "".join(res.output.split()) and "CPR" in res.output
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "discovery" and config["sizes"] == [0.05, 0.2, 1.0]


def test_discover_sizes_none_and_bad_sizes(tmp_path):
    out = tmp_path / "d"
    args = ["discover", "--model", "planted-induction", "--task", "induction", "--n", "50", "--out", str(out)]
    res = runner.invoke(app, [*args, "--method", "eap-ig-activations", "--steps", "1", "--sizes", "none"])
    assert res.exit_code == 0, res.output
    assert not (out / "metrics.json").exists()
    res = runner.invoke(app, [*args, "--sizes", "0.5,0.1"])
    assert res.exit_code == 2 and "ascending" in res.output
    res = runner.invoke(app, [*args, "--method", "eap-igg"])
    assert res.exit_code == 2 and "eap-ig-activations" in res.output
