"""`interplab llc RUN` on a run without a formation report says what to run next as a command that runs as
printed (the right executable, quoted), not a bare `interplab` that may not be on PATH."""

from __future__ import annotations

import shlex

from typer.testing import CliRunner

from interplab import runs
from interplab.cli.common import interplab_executable
from interplab.cli.main import app
from interplab.train import train
from tests.train.conftest import _tiny_config, write_corpus

SAMPLER = ["--draws", "4", "--burn-in", "0", "--chains", "2", "--seqs", "2", "--batch-size", "2"]


def test_llc_without_formation_prints_the_formation_command_as_it_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "my run"  # a space: the printed command must quote it
    train(_tiny_config(write_corpus(tmp_path / "corpus"), steps=2), run_dir)
    out = CliRunner().invoke(app, ["llc", str(run_dir), "--seq-len", "16", *SAMPLER])
    assert out.exit_code == 0, out.output
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("next: ")]
    words = shlex.split(line.removeprefix("next: ").split("  (")[0])
    exe = shlex.split(interplab_executable())
    assert words[: len(exe)] == exe and words[len(exe) :] == ["formation", str(run_dir)], line
    done = CliRunner().invoke(app, [*words[len(exe) :], "--seqs", "2"])
    assert done.exit_code == 0, done.output
    assert (run_dir / runs.FORMATION / "formation_llc.html").is_file()
