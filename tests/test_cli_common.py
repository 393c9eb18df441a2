"""The CLI's shared progress display and printed commands: progress lines without a terminal, commands that
run as printed."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from interplab.cli import common
from interplab.cli.common import JobProgress, command_hint, interplab_executable
from tests.scripts_env import ROOT, script_env


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _log_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()  # not a terminal, as a log file, a pipe, CI or nohup
    return Console(file=buf, width=60), buf


def test_progress_without_a_terminal_prints_periodic_lines():
    out, buf = _log_console()
    clock = Clock()
    with JobProgress("attribute", unit="checkpoints", every_s=10, out=out, clock=clock) as bar:
        assert not bar.live
        for done in range(1, 401):
            clock.t += 0.2925  # 400 checkpoints in ~117 s
            bar(done, 400)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[attribute] 1/400 checkpoints (0%), 0 s elapsed, ~1.9 min left"
    assert lines[3] == "[attribute] 106/400 checkpoints (26%), 31 s elapsed, ~86 s left"
    assert lines[-1] == "[attribute] 400/400 checkpoints (100%), done in 1.9 min"
    assert len(lines) == 13  # the first update, one line per 10 s after it, the end: not one per update
    assert all(len(line) > 60 for line in lines[1:-1])  # never wrapped at the console width


def test_an_update_before_the_job_starts_counts_from_its_creation():
    """`interplab train` says "preparing data" before entering the display: that line showed the clock's
    whole reading (the machine's uptime, "20.0 h elapsed") instead of the time since the job began."""
    out, buf = _log_console()
    clock = Clock()
    clock.t = 72_000.0  # a monotonic clock reads the time since boot
    bar = JobProgress("train", total=10, unit="steps", out=out, clock=clock)
    clock.t += 3
    bar.update(info="preparing data")
    with bar:
        clock.t += 12
        bar(5, 10)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[train] 3 s elapsed  preparing data"
    assert lines[-1] == "[train] 5/10 steps (50%), done in 12 s  preparing data"


def test_progress_lines_show_info_stages_and_unknown_totals():
    out, buf = _log_console()
    clock = Clock()
    with JobProgress("features build", unit="batches", every_s=5, out=out, clock=clock) as bar:
        bar.update(1, total=4, stage="features 0-511")
        clock.t += 1
        bar.update(2, stage="features 0-511")  # under 5 s since the last line: quiet
        bar.update(1, total=4, stage="features 512-1023")  # a new stage always gets a line
        clock.t += 6
        bar.update(3, info="[bold]not markup[/]")
    with JobProgress("route era-stdlib", every_s=5, out=out, clock=clock) as bar:
        bar.update(info="seed 0 routed")  # a job without counts: its messages and the time
    lines = buf.getvalue().splitlines()
    assert lines == [
        "[features build: features 0-511] 1/4 batches (25%), 0 s elapsed",
        "[features build: features 512-1023] 1/4 batches (25%), 1 s elapsed, ~3 s left",
        "[features build: features 512-1023] 3/4 batches (75%), 7 s elapsed, ~2 s left  [bold]not markup[/]",
        "[features build: features 512-1023] 3/4 batches (75%), done in 7 s  [bold]not markup[/]",
        "[route era-stdlib] 0 s elapsed  seed 0 routed",
        "[route era-stdlib] done in 0 s  seed 0 routed",
    ]


def test_progress_interval_from_the_environment_and_quiet_on_errors(monkeypatch):
    monkeypatch.setenv("INTERPLAB_PROGRESS_SECONDS", "0")
    out, buf = _log_console()
    with pytest.raises(RuntimeError):
        with JobProgress("train", total=3, unit="steps", out=out, clock=Clock()) as bar:
            for step in (1, 2, 3):
                bar.update(step, info=f"loss {4 - step:.3f}")
            raise RuntimeError("diverged")
    assert buf.getvalue().splitlines() == [
        "[train] 1/3 steps (33%), 0 s elapsed  loss 3.000",
        "[train] 2/3 steps (67%), 0 s elapsed  loss 2.000",
        "[train] 3/3 steps (100%), 0 s elapsed  loss 1.000",
    ]  # no "done" line for a job that failed


def test_progress_on_a_terminal_is_a_live_bar():
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=True, width=120)
    with JobProgress("sae train", total=10, unit="steps", out=out) as bar:
        assert bar.live
        bar.update(5, info="L0 16.0")
        bar.update(10)
    text = buf.getvalue()
    assert "sae train" in text and "10/10" in text and "[sae train]" not in text


def test_a_long_cli_job_logs_progress_when_piped(tmp_path):
    """The real command with stdout to a pipe (as under nohup or CI) prints progress lines as it goes."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "interplab",
            "train",
            "--preset",
            "modadd",
            "--steps",
            "30",
            "--out",
            str(tmp_path / "run"),
            "--threads",
            "1",
        ],  # fmt: skip
        cwd=ROOT,
        env=script_env(INTERPLAB_PROGRESS_SECONDS="0"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[modadd] ")]
    assert len(lines) >= 3, done.stdout
    assert any("/30 steps (" in line and "loss" in line for line in lines), lines
    assert lines[-1].startswith("[modadd] 30/30 steps (100%), done in "), lines


def test_command_hint_quotes_arguments():
    hint = command_hint("serve", "--db", Path("my runs/features.db"), "--runs", "a'b")
    exe = interplab_executable()
    assert hint == f"{exe} serve --db 'my runs/features.db' --runs 'a'\"'\"'b'"
    assert shlex.split(hint)[-4:] == ["--db", "my runs/features.db", "--runs", "a'b"]


def test_executable_is_what_runs_here(tmp_path, monkeypatch):
    venv_bin = tmp_path / "repo" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    script = venv_bin / "interplab"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (venv_bin / "activate").write_text("")
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setattr(sys, "argv", [str(venv_bin / "python"), "-m", "interplab"])
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv is not activated
    assert interplab_executable() == ".venv/bin/interplab"
    assert common.activation_hint() == (
        "(to type plain `interplab` instead of .venv/bin/interplab, activate its environment first: "
        "source .venv/bin/activate)"
    )
    monkeypatch.chdir(venv_bin.parent.parent.parent)  # below cwd: the relative path
    assert interplab_executable() == "repo/.venv/bin/interplab"
    (tmp_path / "else where").mkdir()
    monkeypatch.chdir(tmp_path / "else where")  # elsewhere: the full path (quoted when it needs it)
    assert interplab_executable() == shlex.quote(str(script))
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}/usr/bin")  # activated: plain interplab
    assert interplab_executable() == "interplab" and common.activation_hint() is None
    script.unlink()  # no script at all: python -m interplab through this interpreter
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert interplab_executable() == f"{shlex.quote(sys.executable)} -m interplab"
