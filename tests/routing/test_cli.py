import json

import pytest
from typer.testing import CliRunner

from interplab.cli.main import app


def test_route_rejects_an_unknown_preset():
    result = CliRunner().invoke(app, ["route", "--preset", "nope"])
    assert result.exit_code != 0
    assert "digits-split" in result.output and "era-stdlib" in result.output


@pytest.mark.slow
def test_route_digits_quick_writes_a_run_directory(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["route", "--preset", "digits-split", "--quick", "--out", str(out), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["experiment"] == "digits-split" and set(report["summary"]) == {"routed", "control"}
    assert (out / "reconstructions.html").is_file()
    assert "routed" in result.output and "control" in result.output
