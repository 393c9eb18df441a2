"""``interplab formation RUN_DIR``: watch induction heads form across a run's checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import typer

from interplab.cli.common import (
    JobProgress,
    console,
    fail,
    out_folder,
    positive_int,
    set_threads,
    threads_option,
)


def run_formation(run_dir: Path, out: Path | None, seqs: int) -> tuple[Any, dict[str, Any]]:
    from interplab.train.formation import formation

    try:
        with JobProgress("formation", unit="checkpoints") as bar:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # skipped checkpoints are printed below
                result = formation(run_dir, n_seqs=seqs, progress=bar)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    paths = result.save(out or run_dir / "formation")
    return result, paths


def print_formation(result: Any, paths: dict[str, Any], every: int) -> None:
    from rich.table import Table

    table = Table(title="induction-head formation", show_lines=False)
    for col in (
        "step",
        "tokens",
        "val loss",
        "max induction",
        "max prev-token",
        "loss 1st half",
        "loss repeated half",
        "ICL score",
    ):
        table.add_column(col, justify="right")
    rows = result.table()
    keep = set(range(0, len(rows), every)) | {len(rows) - 1}
    if result.formation_step is not None:
        i = result.steps.index(result.formation_step)
        keep.update({max(i - 1, 0), i})
    for i in sorted(keep):
        r = rows[i]
        style = "bold green" if r["step"] == result.formation_step else None
        table.add_row(
            str(r["step"]),
            f"{r['tokens']:,}",
            _f(r["val_loss"]),
            f"{r['max_induction']:.3f}",
            f"{r['max_prev_token']:.3f}",
            f"{r['repeated_loss_first']:.2f}",
            f"{r['repeated_loss_second']:.2f}",
            _f(r["icl_score"]),
            style=style,
        )
    console.print(table)
    for item in result.skipped:
        console.print(f"[yellow]skipped checkpoint[/] {item}")
    console.print(result.summary())
    console.print(f"table: {paths['table']}\ninteractive plot: {paths['html']}")
    if paths["png"]:
        console.print(f"picture: {paths['png']}")
    else:
        console.print(paths["png_error"], style="yellow", markup=False, soft_wrap=True)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def formation_command(
    run_dir: Path = typer.Argument(..., help="a training run directory (from interplab train)"),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="where to write the table and plots (default RUN_DIR/formation)",
        callback=out_folder,
    ),
    seqs: int = typer.Option(
        8, "--seqs", help="repeated random sequences per checkpoint", callback=positive_int
    ),
    every: int = typer.Option(
        3, "--every", help="print every k-th checkpoint in the table (all are saved)", callback=positive_int
    ),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads", callback=threads_option),
) -> None:
    """Score every checkpoint (induction and previous-token score per head, in-context score, held-out loss)
    and report the step where the induction heads form."""
    set_threads(threads)
    result, paths = run_formation(run_dir, out, seqs)
    print_formation(result, paths, every)


def register(app: typer.Typer) -> None:
    app.command("formation")(formation_command)
