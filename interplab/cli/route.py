"""``interplab route --preset digits-split|era-stdlib``: gradient-routing experiments into a run directory."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from interplab.cli.common import (
    JobProgress,
    claim_out,
    console,
    fail,
    library_default,
    out_folder,
    positive_int,
    set_threads,
    threads_param,
)
from interplab.routing.digits import DigitsSplitConfig, DigitsSplitResult, run_digits_split
from interplab.routing.era import ERAConfig, ERAResult, era_stdlib_data, run_era
from interplab.runs import Kind


class Preset(str, Enum):
    DIGITS_SPLIT = "digits-split"
    ERA_STDLIB = "era-stdlib"


def route(
    preset: Preset = typer.Option(
        ..., "--preset", help="digits-split (split autoencoder) or era-stdlib (unlearning)"
    ),
    out: Path = typer.Option(
        None, "--out", help="run directory (default runs/route-<preset>)", callback=out_folder
    ),
    seeds: int = typer.Option(
        len(DigitsSplitConfig.seeds), "--seeds", help="digits-split: number of seeds", callback=positive_int
    ),
    steps: int = typer.Option(
        None, "--steps", help="training steps (default: the preset's)", callback=positive_int
    ),
    forget: str = typer.Option(
        library_default(era_stdlib_data, "forget"),
        "--forget",
        help="era-stdlib: stdlib package whose files are forgotten",
    ),
    quick: bool = typer.Option(False, "--quick", help="a much smaller run, to try the command"),
    threads: int = threads_param(help="torch threads"),
) -> None:
    """Run a gradient-routing experiment; writes report.json, the comparison table and pictures."""
    set_threads(threads)
    out = claim_out(out or Path("runs") / f"route-{preset.value}", Kind.ROUTING)
    start = time.perf_counter()
    with JobProgress(f"route {preset.value}") as bar:
        progress = lambda msg: bar.update(info=msg)  # noqa: E731
        result: DigitsSplitResult | ERAResult
        try:
            if preset is Preset.DIGITS_SPLIT:
                cfg = DigitsSplitConfig.preset(n_seeds=seeds, steps=steps, quick=quick)
                result = run_digits_split(cfg, progress=progress)
                header = ["condition", "certificate ratio (mean [95% CI])", "1st half err 0-4 / 5-9",
                          "2nd half err 0-4 / 5-9", "autoencoder err"]  # fmt: skip
                rows = result.table()
            else:
                data = era_stdlib_data(forget, quick=quick)
                result = run_era(data, ERAConfig.stdlib(quick=quick, steps=steps), progress=progress)
                header, *rows = result.table()
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
        result.save(out)
    table = Table(title=f"route {preset.value}")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        f"done in {time.perf_counter() - start:.0f}s; outputs in [bold]{out}[/] (report.json, pictures)"
    )


def register(app: typer.Typer) -> None:
    app.command("route")(route)
