"""Small helpers shared by the CLI modules: console, errors, thread settings, the validators every command
uses for its arguments (so bad input ends in one line naming the value and what is valid, before anything is
loaded or written), the progress of long jobs (:class:`JobProgress`) and the commands shown to the user
(:func:`command_hint`)."""

from __future__ import annotations

import inspect
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from interplab.model import Transformer
from interplab.model.load import load_model, model_source
from interplab.model.precision import check_dtype
from interplab.runs import Kind, RunError, check_out

console = Console(stderr=False)
err_console = Console(stderr=True)


class UsageError(Exception):
    """Bad command-line input found by a command: one line on stderr, exit code 2 (see `interplab.cli.main`)."""

    exit_code = 2


class CommandError(Exception):
    """A command that could not finish for a reason it explains: one line on stderr, exit code 1."""

    exit_code = 1


def fail(message: str, code: int = 2) -> NoReturn:
    """End the command with one clear line (no traceback): code 2 for bad input, 1 for a failed job."""
    raise UsageError(message) if code == 2 else CommandError(message)


def set_threads(threads: int | None) -> None:
    """Set torch's thread count (and a passive OpenMP wait policy, much faster on shared machines)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        import torch

        torch.set_num_threads(threads)


def library_default(fn: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of the library function ``fn``: a command's default is the library's,
    never typed a second time (config dataclasses: use the field, ``ScrubConfig.n_seeds``)."""
    default = inspect.signature(fn).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{fn.__qualname__}() has no default for {name!r}")
    return default


# --- argument validators -------------------------------------------------------------------------------------
# Typer callbacks (``typer.Option(..., callback=positive_int)``) run while the command line is parsed, so a bad
# value is refused before a model is loaded or a folder is created. ``None`` (an option left unset) passes.


def _bad(value: Any, valid: str) -> NoReturn:
    raise typer.BadParameter(f"{value!r} is not {valid}")


def positive_int(value: int | None) -> int | None:
    if value is not None and value < 1:
        _bad(value, "a positive integer (>= 1)")
    return value


SPLITS = ("train", "validation")
"""The corpus splits a ``--split`` option accepts."""


def choice(valid: tuple[str, ...]) -> Callable[[str | None], str | None]:
    """A typer callback accepting one of ``valid`` (named in the error)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in valid:
            raise typer.BadParameter(f"{value!r} is not one of: {', '.join(valid)}")
        return value

    return check


def non_negative_int(value: int | None) -> int | None:
    if value is not None and value < 0:
        _bad(value, "a non-negative integer (>= 0)")
    return value


def threads_option(value: int | None) -> int | None:
    """``--threads``: a positive thread count (0 or unset: torch's default)."""
    if value is not None and value < 0:
        _bad(value, "a thread count (>= 1, or 0 for torch's default)")
    return value


def positive_float(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        _bad(value, "a finite positive number")
    return value


def non_negative_float(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        _bad(value, "a finite number >= 0")
    return value


def finite_float(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        _bad(value, "a finite number")
    return value


def port_option(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= 65535:
        _bad(value, "a TCP port (1-65535)")
    return value


def valid_devices() -> list[str]:
    """The devices this torch build can use here: cpu, cuda and cuda:N when CUDA is available, mps on Apple."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def device_option(value: str | None) -> str | None:
    """``--device``: one of `valid_devices` (a CUDA device on a CPU-only build is refused here, by name)."""
    if value is None:
        return None
    valid = valid_devices()
    if value.strip().lower() not in valid:
        import torch

        why = "" if torch.cuda.is_available() or not value.startswith("cuda") else " (this torch has no CUDA)"
        raise typer.BadParameter(f"{value!r} is not a device here{why}; valid: {', '.join(valid)}")
    return value.strip().lower()


MODEL_DTYPES = ("float32", "bfloat16", "float16")
"""the dtypes a command's ``--dtype`` loads its model in (``bf16``, ``fp16``, ``fp32`` are read too)"""


def model_dtype(value: str | None) -> str | None:
    """``--dtype`` of a command's model: one of `MODEL_DTYPES` (or bf16, fp16, fp32), as its full name."""
    if value is None:
        return None
    try:
        dtype = check_dtype(value)
    except ValueError:
        dtype = None
    name = str(dtype).removeprefix("torch.")
    if name not in MODEL_DTYPES:
        raise typer.BadParameter(f"{value!r} is not one of: {', '.join(MODEL_DTYPES)} (or bf16, fp16, fp32)")
    return name


def dtype_option(flag: str = "--dtype") -> Any:
    """The option every command that loads a model shares: the dtype the model runs in (float32 by default;
    `model_dtype` checks it), passed on to `load_model_arg`: ``dtype: str = dtype_option()``."""
    return typer.Option(
        "float32",
        flag,
        help="dtype the model runs in: float32, bfloat16 (bf16) or float16 (fp16)",
        callback=model_dtype,
    )


def threads_param(default: int | None = None, help: str | None = None) -> Any:
    """``--threads`` (torch CPU threads; None: torch's default), checked by `threads_option`, for `set_threads`:
    ``threads: int = threads_param()``."""
    return typer.Option(default, "--threads", help=help, callback=threads_option)


EVAL_BATCH_SEQS = 16
"""sequences per batch of the evaluation commands' corpus batches (``--batches`` counts them)"""


def corpus_option(help: str | None = None) -> Any:
    """``--corpus``: python-stdlib (the default) or a file, folder or dataset path."""
    return typer.Option("python-stdlib", "--corpus", help=help)


def split_option(default: str) -> Any:
    """``--split``: the corpus split, train or validation."""
    return typer.Option(default, "--split", callback=choice(SPLITS))


def seq_len_option(
    help: str | None = "tokens per sequence (default 128, or the model's n_ctx if shorter)",
) -> Any:
    """``--seq-len`` of a command that reads a corpus through a model (None: `check_seq_len` picks it)."""
    return typer.Option(None, "--seq-len", help=help, callback=positive_int)


def batches_option() -> Any:
    """``--batches`` of an evaluation: how many batches of `EVAL_BATCH_SEQS` sequences it reads."""
    return typer.Option(8, "--batches", help=f"batches of {EVAL_BATCH_SEQS} sequences", callback=positive_int)


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_out_folder(path: Path | None, option: str = "--out") -> Path | None:
    """An output folder that can be written: an existing folder, or a new one whose nearest existing parent is
    a writable folder. Creates nothing."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{str(path)!r} is a file, not a folder", param_hint=f"'{option}'")
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise typer.BadParameter(
            f"{str(path)!r} cannot be a folder: {str(base)!r} is a file", param_hint=f"'{option}'"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise typer.BadParameter(
            f"{str(path)!r} cannot be written: {str(base)!r} is read-only", param_hint=f"'{option}'"
        )
    return path


def check_out_file(path: Path | None, option: str = "--out") -> Path | None:
    """An output file that can be written (a new or an existing file, not a folder). Creates nothing."""
    if path is None or "://" in str(path):  # a database URL is checked by the database
        return path
    if path.is_dir():
        raise typer.BadParameter(f"{str(path)!r} is a folder, not a file", param_hint=f"'{option}'")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise typer.BadParameter(f"{str(path)!r} is read-only", param_hint=f"'{option}'")
        return path
    check_out_folder(path.parent, option)
    return path


def claim_out(path: Path, kind: Kind, *also: Kind) -> Path:
    """`interplab.runs.check_out` as one line for the user: a folder holding another kind of run is refused
    before anything is computed or written."""
    try:
        return check_out(path, kind, *also)
    except RunError as err:
        fail(str(err))


def out_folder(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Typer callback: `check_out_folder` for this option."""
    return check_out_folder(value, _option_name(param))


def db_source(value: str | Path | None) -> str | Path | None:
    """A feature database as given on the command line: a URL (``postgresql://user@host/dbname``) stays text
    (a `Path` would fold its ``//``), anything else is a path."""
    from interplab.features.database import is_url

    if value is None or isinstance(value, Path):
        return value
    return value if is_url(value) else Path(value)


def db_link(source: str | Path) -> str:
    """`interplab.features.database.database_link`: how a run records a database given as ``source``."""
    from interplab.features.database import database_link

    return database_link(source)


def db_option(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | Path | None:
    """Typer callback of a ``--db`` option (declared ``str``): `db_source`."""
    return db_source(value)


def db_out_option(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | Path | None:
    """Typer callback of a database a command writes: `db_source`, a path checked by `check_out_file`."""
    source = db_source(value)
    return check_out_file(source, _option_name(param)) if isinstance(source, Path) else source


DB_ERRORS = (FileNotFoundError, ValueError, ConnectionError, ImportError)
"""what opening a feature database raises for a bad path or URL, a foreign database, an unreachable server or
a missing driver (each with a message for the user)"""


def out_file(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Typer callback: `check_out_file` for this option."""
    return check_out_file(value, _option_name(param))


def _option_name(param: Any) -> str:
    opts = getattr(param, "opts", None) or []
    return max(opts, key=len) if opts else str(getattr(param, "name", "--out"))


def check_seq_len(
    seq_len: int | None, model: Transformer, option: str = "--seq-len", default: int = 128
) -> int:
    """The sequence length to use: ``seq_len`` if it fits the model's context window (it is never shortened
    silently: a longer one is an error naming both), or ``default`` capped at n_ctx when unset."""
    n_ctx = model.cfg.n_ctx
    if seq_len is None:
        return min(default, n_ctx)
    if seq_len > n_ctx:
        fail(
            f"{option} {seq_len} is longer than the model's context window n_ctx={n_ctx}; use {option} <= {n_ctx}"
        )
    return seq_len


_MODEL_ERRORS = (FileNotFoundError, KeyError, ValueError)  # what a path that holds no (readable) model raises


def _no_model(what: str, err: Exception) -> NoReturn:
    fail(what + str(err).strip("'\""))


def model_arg_source(path: Path, what: str = "") -> Path:
    """The model folder (or file) a command's model argument stands for (`interplab.model.load.model_source`:
    ``RUN/final`` for a training run ``RUN``); a path with no model ends in one line, after ``what``."""
    try:
        return model_source(path)
    except _MODEL_ERRORS as err:
        _no_model(what, err)


def load_model_arg(path: Path, what: str = "", dtype: str | None = None) -> Transformer:
    """Load the model a command was given (a model folder or file, or a training run: its ``final/``), saying
    ``loaded RUN/final`` when the path stood for another folder; a path with no model, or one that does not
    load, ends in one line (after ``what``, e.g. ``"cannot load the model: "``). ``dtype`` (a command's
    `dtype_option`; None: as stored) is the dtype the model runs in. Every command that takes a model loads
    it here."""
    source = model_arg_source(path, what)
    try:
        model = load_model(source, dtype=dtype)
    except _MODEL_ERRORS as err:
        _no_model(what, err)
    if source != Path(path):
        console.print(f"loaded {source}", markup=False, highlight=False, soft_wrap=True)
    return model


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
        # the job's clock starts here (an update before `with` counts from here) and again on entering
        self._start, self._last_line = self.clock(), 0.0
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
