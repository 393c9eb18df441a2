"""Small helpers shared by the CLI modules: console, errors, thread settings."""

from __future__ import annotations

import os

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
