"""``interplab route --preset digits-split|era-stdlib``: gradient-routing experiments into a run directory."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

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
    seeds: int = typer.Option(5, "--seeds", help="digits-split: number of seeds", callback=positive_int),
    steps: int = typer.Option(
        None, "--steps", help="training steps (default: the preset's)", callback=positive_int
    ),
    forget: str = typer.Option(
        "email", "--forget", help="era-stdlib: stdlib package whose files are forgotten"
    ),
    quick: bool = typer.Option(False, "--quick", help="a much smaller run, to try the command"),
    threads: int = typer.Option(None, "--threads", help="torch threads", callback=threads_option),
) -> None:
    """Run a gradient-routing experiment; writes report.json, the comparison table and pictures."""
    set_threads(threads)
    from rich.table import Table

    out = out or Path("runs") / f"route-{preset.value}"
    start = time.perf_counter()
    with JobProgress(f"route {preset.value}") as bar:
        progress = lambda msg: bar.update(info=msg)  # noqa: E731
        try:
            if preset is Preset.DIGITS_SPLIT:
                from interplab.routing.digits import DigitsSplitConfig, run_digits_split

                kwargs: dict = {"seeds": tuple(range(seeds))}
                if steps is not None:
                    kwargs["steps"] = steps
                if quick:
                    kwargs.update(seeds=(0, 1), steps=300, certificate_steps=200)
                result = run_digits_split(DigitsSplitConfig(**kwargs), progress=progress)
                header = ["condition", "certificate ratio (mean [95% CI])", "1st half err 0-4 / 5-9",
                          "2nd half err 0-4 / 5-9", "autoencoder err"]  # fmt: skip
                rows = result.table()
            else:
                from interplab.routing.era import run_era
                from interplab.routing.era_data import package_rule, stdlib_windows

                cfg = era_stdlib_config(quick=quick, steps=steps)
                data = stdlib_windows(forget=package_rule(forget), seq_len=96 if not quick else 48,
                                      retain_bytes=3_000_000 if not quick else 400_000)  # fmt: skip
                result = run_era(data, cfg, progress=progress)
                header, *rows = result.table()
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
            return
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


def era_stdlib_config(*, quick: bool = False, steps: int | None = None):
    from interplab.routing.era import ERAConfig

    if quick:
        return ERAConfig(d_model=32, n_layers=1, n_heads=2, d_mlp=64, expand_units=32, steps=100 if steps is None else steps,
                         batch_size=8, relearn_sizes=(1, 4, 16), relearn_steps=10, eval_windows=64,
                         retain_finetune_steps=10)  # fmt: skip
    return ERAConfig(d_model=96, n_layers=2, n_heads=4, d_mlp=384, expand_units=96, steps=500 if steps is None else steps,
                     batch_size=16, eval_windows=128)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("route")(route)
