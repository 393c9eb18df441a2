"""Small helpers shared by the CLI modules: console, errors, thread settings, and the validators every
command uses for its arguments (so bad input ends in one line naming the value and what is valid, before
anything is loaded or written)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

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


# --- argument validators -------------------------------------------------------------------------------------
# Typer callbacks (``typer.Option(..., callback=positive_int)``) run while the command line is parsed, so a bad
# value is refused before a model is loaded or a folder is created. ``None`` (an option left unset) passes.


def _bad(value: Any, valid: str) -> NoReturn:
    raise typer.BadParameter(f"{value!r} is not {valid}")


def positive_int(value: int | None) -> int | None:
    if value is not None and value < 1:
        _bad(value, "a positive integer (>= 1)")
    return value


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


def out_folder(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Typer callback: `check_out_folder` for this option."""
    return check_out_folder(value, _option_name(param))


def out_file(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Typer callback: `check_out_file` for this option."""
    return check_out_file(value, _option_name(param))


def _option_name(param: Any) -> str:
    opts = getattr(param, "opts", None) or []
    return max(opts, key=len) if opts else str(getattr(param, "name", "--out"))


def check_seq_len(seq_len: int | None, model: Any, option: str = "--seq-len", default: int = 128) -> int:
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
