"""``interplab formation RUN_DIR``: watch induction heads form across a run's checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from interplab import runs
from interplab.cli.common import (
    JobProgress,
    command_hint,
    console,
    fail,
    out_folder,
    positive_int,
    set_threads,
    threads_param,
)

if TYPE_CHECKING:
    from interplab.analysis.formation import FormationResult


def run_formation(run_dir: Path, out: Path | None, seqs: int) -> tuple[FormationResult, dict[str, Any]]:
    """Score every checkpoint of ``run_dir`` with a progress bar and save the result (default
    ``RUN_DIR/formation``)."""
    from interplab.analysis.formation import formation  # the library behind a command is imported lazily

    try:
        with JobProgress("formation", unit="checkpoints") as bar:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # skipped checkpoints are printed below
                result = formation(run_dir, n_seqs=seqs, progress=bar)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    paths = result.save(out or run_dir / runs.FORMATION)
    return result, paths


def print_formation(result: FormationResult, paths: dict[str, Any], every: int) -> None:
    from interplab.analysis.formation import COLUMNS, row_cells

    table = Table(title="induction-head formation", show_lines=False)
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for r in result.shown_rows(every):
        style = "bold green" if r["step"] == result.formation_step else None
        table.add_row(*row_cells(r), style=style)
    console.print(table)
    for item in result.skipped:
        console.print(f"[yellow]skipped checkpoint[/] {item}")
    console.print(result.summary())
    console.print(f"table: {paths['table']}\ninteractive plot: {paths['html']}")
    if paths["png"]:
        console.print(f"picture: {paths['png']}")
    else:
        console.print(paths["png_error"], style="yellow", markup=False, soft_wrap=True)


def print_diffs(run_dir: Path, formation_step: int | None) -> None:
    """The run's model diffs (``RUN/diffs/*``, `interplab sae diff`) beside its formation report: each with
    its new / lost / shared counts and whether it brackets the formation step; without any, the command that
    diffs the two checkpoints either side of the formation step."""
    from interplab.sae.diffing import formation_window  # the library behind a command is imported lazily

    try:
        run = runs.TrainRun.open(run_dir)
    except runs.RunError:
        return  # a formation report of a folder that is no training run has no diffs
    diffs = run.diffs
    for name, folder in diffs.items():
        console.print(f"model diff {name}: {runs.describe(folder)}", markup=False, soft_wrap=True)
        console.print(f"  table: {folder / runs.DIFF_TABLE}", markup=False, soft_wrap=True)
    window = formation_window(run_dir, formation_step)
    if window is None or f"{runs.checkpoint_name(window[0])}-{runs.checkpoint_name(window[1])}" in diffs:
        return
    hint = command_hint("sae", "diff", run_dir, "--before", str(window[0]), "--after", str(window[1]))
    console.print(
        f"features that appear as the head forms (the checkpoints either side of step {formation_step}): "
        f"{hint}",
        markup=False,
        soft_wrap=True,
    )


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
    threads: int = threads_param(help="torch CPU threads"),
) -> None:
    """Score every checkpoint (induction and previous-token score per head, in-context score, held-out loss)
    and report the step where the induction heads form."""
    set_threads(threads)
    result, paths = run_formation(run_dir, out, seqs)
    print_formation(result, paths, every)
    print_diffs(run_dir, result.formation_step)
    if out is None and (run_dir / runs.LLC / runs.REPORT).is_file():  # `interplab llc` ran: draw it beside
        from interplab.dynamics.run import join_formation

        joined = join_formation(run_dir)
        if joined is not None:
            console.print(f"LLC beside the induction scores: {joined['html']}")


def register(app: typer.Typer) -> None:
    app.command("formation")(formation_command)
