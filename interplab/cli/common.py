"""Small helpers shared by the CLI modules: console, errors, thread settings, the progress of long jobs
(:class:`JobProgress`) and the commands shown to the user (:func:`command_hint`)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit."""
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def set_threads(threads: int | None) -> None:
    """Set torch's thread count (and a passive OpenMP wait policy, much faster on shared machines)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        import torch

        torch.set_num_threads(threads)


# --- progress of long jobs: a live bar on a terminal, periodic log lines otherwise ---------------------------

PROGRESS_EVERY_S = 10.0
"""Seconds between progress lines when output is not a terminal (env INTERPLAB_PROGRESS_SECONDS overrides)."""


class JobProgress:
    """The progress of one long CLI job, the one display every long command uses.

    On a terminal it is a live rich bar (one row per stage); when output is not a terminal (a log file, CI,
    ``nohup``, a pipe) a live bar would print nothing until the end, so it writes a plain line at the first
    update, then at most every ``every_s`` seconds, when a stage starts and when the job ends::

        [attribute] 120/400 checkpoints (30%), 35 s elapsed, ~80 s left

    Feed it with ``update(completed, total=..., info=...)``, or call it as ``progress(done, total)`` (the
    library's callback shape). ``stage=`` starts a new row (``features build`` runs one pass per stage)."""

    def __init__(
        self,
        label: str,
        *,
        total: int | None = None,
        unit: str = "",
        every_s: float | None = None,
        out: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.unit, self.clock = label, unit, clock
        self.console = out if out is not None else console
        if every_s is None:
            every_s = float(os.environ.get("INTERPLAB_PROGRESS_SECONDS", PROGRESS_EVERY_S))
        self.every_s = every_s
        self.live = self.console.is_terminal
        self._stages: dict[str, dict[str, Any]] = {}
        self._stage = label
        self._bar: Any = None
        self._start = self._last_line = 0.0
        self._printed = False
        self._new_stage(label, total)

    def __enter__(self) -> JobProgress:
        self._start = self.clock()
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self._bar.__enter__()
            for name, s in self._stages.items():
                s["task"] = self._bar.add_task(name, total=s["total"], unit=self.unit, info=s["info"])
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, *exc)
            self._bar = None
        elif exc_type is None and self._printed:
            self._line(done=True)

    def __call__(self, completed: int | None, total: int | None = None) -> None:
        self.update(completed, total=total)

    def update(
        self,
        completed: int | None = None,
        *,
        total: int | None = None,
        info: str | None = None,
        stage: str | None = None,
    ) -> None:
        """Record progress; ``None`` leaves a field as it was."""
        new_stage = stage is not None and stage not in self._stages
        if new_stage:
            self._drop_unused_default()
            self._new_stage(stage, total)  # type: ignore[arg-type]
        if stage is not None:
            self._stage = stage
        s = self._stages[self._stage]
        for key, value in (("completed", completed), ("total", total), ("info", info)):
            if value is not None:
                s[key] = value
        if self._bar is not None:
            if s.get("task") is None:
                s["task"] = self._bar.add_task(self._stage, total=s["total"], unit=self.unit, info=s["info"])
            self._bar.update(s["task"], completed=s["completed"] or 0, total=s["total"], info=s["info"])
            return
        now = self.clock()
        if not self._printed or new_stage or now - self._last_line >= self.every_s:
            self._line()

    def _drop_unused_default(self) -> None:
        # a job made of stages shows one row per stage, not an empty row for the job itself
        default = self._stages.get(self.label)
        if default is not None and default["completed"] is None and not default["info"]:
            del self._stages[self.label]
            if self._bar is not None and default["task"] is not None:
                self._bar.remove_task(default["task"])

    def _new_stage(self, name: str, total: int | None) -> None:
        self._stages[name] = {"completed": None, "total": total, "info": "", "task": None}

    def _line(self, *, done: bool = False) -> None:
        s = self._stages[self._stage]
        now = self.clock()
        elapsed = now - self._start
        name = self.label if self._stage == self.label else f"{self.label}: {self._stage}"
        parts = []
        n, total = s["completed"], s["total"]
        unit = f" {self.unit}" if self.unit else ""
        if n is not None and total:
            parts.append(f"{n:,}/{total:,}{unit} ({n / total:.0%})")
        elif n is not None:
            parts.append(f"{n:,}{unit}")
        if done:
            parts.append(f"done in {_seconds(elapsed)}")
        else:
            parts.append(f"{_seconds(elapsed)} elapsed")
            if n and total and n < total and elapsed > 0:
                parts.append(f"~{_seconds(elapsed * (total - n) / n)} left")
        line = f"[{name}] " + ", ".join(parts) + (f"  {s['info']}" if s["info"] else "")
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._printed, self._last_line = True, now


def _seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 100:
        return f"{s:.0f} s"
    if s < 6000:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


# --- commands shown to the user: runnable as printed -------------------------------------------------------


def interplab_executable() -> str:
    """What the user types to run interplab, as a shell word: ``interplab`` when that name on PATH is this
    installation, else the path of this installation's ``interplab`` script (relative to the current folder
    when inside it, e.g. ``.venv/bin/interplab`` from the repository root), else ``python -m interplab``."""
    candidates = [Path(sys.argv[0])] if Path(sys.argv[0]).name == "interplab" else []
    candidates.append(Path(sys.executable).parent / "interplab")
    script = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if script is None:
        return f"{shlex.quote(sys.executable)} -m interplab"
    on_path = shutil.which("interplab")
    if on_path is not None and _same_file(Path(on_path), script):
        return "interplab"
    return shlex.quote(_relative(script))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def command_hint(*args: str | Path) -> str:
    """The interplab command ``args`` as the user can paste it here: the right executable (see
    :func:`interplab_executable`) and every argument shell-quoted. ``command_hint("serve", "--db", path)``."""
    return " ".join([interplab_executable(), *(shlex.quote(str(a)) for a in args)])


def print_command(prefix: str, *args: str | Path, note: str = "", style: str | None = None) -> None:
    """Print ``prefix`` + :func:`command_hint` ``(*args)`` + ``note`` on one unwrapped line (a command broken
    over two lines does not paste; paths are never read as rich markup)."""
    console.print(
        prefix + command_hint(*args) + note, markup=False, highlight=False, soft_wrap=True, style=style
    )


def activation_hint() -> str | None:
    """One line on how to type plain ``interplab`` when it is not on PATH here (e.g. ``.venv`` not activated),
    or None when it is."""
    exe = interplab_executable()
    if exe == "interplab":
        return None
    activate = Path(sys.executable).parent / "activate"
    if not activate.is_file():
        return f"(these commands run as printed; `{exe}` is how this installation is started from here)"
    shown = shlex.quote(_relative(activate))
    return f"(to type plain `interplab` instead of {exe}, activate its environment first: source {shown})"


def _relative(path: Path) -> str:
    full = path.absolute()
    try:
        rel = str(full.relative_to(Path.cwd()))
        return rel if "/" in rel else f"./{rel}"
    except ValueError:
        return str(full)
