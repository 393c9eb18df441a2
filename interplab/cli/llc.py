"""``interplab llc RUN_DIR``: the local learning coefficient of every checkpoint of a run (total and per
component), written to ``RUN_DIR/llc`` and drawn beside the induction scores of ``RUN_DIR/formation``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from interplab.cli.common import (
    JobProgress,
    claim_out,
    console,
    fail,
    non_negative_int,
    out_folder,
    positive_float,
    positive_int,
    print_command,
    set_threads,
    threads_param,
)
from interplab.runs import LLC, Kind

_DEFAULTS = {"step_size": 1e-4, "gamma": 100.0, "chains": 4, "draws": 200, "burn_in": 50, "batch_size": 64}


def llc_command(
    run_dir: Path = typer.Argument(..., help="a training run directory (from interplab train)"),
    component: list[str] = typer.Option(
        [],
        "--component",
        "-c",
        help="also estimate per component (repeatable): heads (every head), layers (every layer), L1H0, layer1",
    ),
    steps: str = typer.Option(
        None,
        "--steps",
        help="only these checkpoint steps, comma-separated (default: every intact checkpoint)",
    ),
    every: int = typer.Option(
        1, "--every", help="every k-th checkpoint (the last one always)", callback=positive_int
    ),
    seqs: int = typer.Option(
        64, "--seqs", help="training windows the LLC is estimated on", callback=positive_int
    ),
    seq_len: int = typer.Option(
        None, "--seq-len", help="tokens per window (default: the run's)", callback=positive_int
    ),
    step_size: float = typer.Option(
        _DEFAULTS["step_size"], "--step-size", help="SGLD step size epsilon", callback=positive_float
    ),
    gamma: float = typer.Option(
        _DEFAULTS["gamma"],
        "--gamma",
        help="localisation strength around the checkpoint",
        callback=positive_float,
    ),
    nbeta: float = typer.Option(
        None, "--nbeta", help="n * inverse temperature (default n / log n)", callback=positive_float
    ),
    chains: int = typer.Option(_DEFAULTS["chains"], "--chains", callback=positive_int),
    draws: int = typer.Option(_DEFAULTS["draws"], "--draws", help="draws per chain", callback=positive_int),
    burn_in: int = typer.Option(_DEFAULTS["burn_in"], "--burn-in", callback=non_negative_int),
    batch_size: int = typer.Option(
        _DEFAULTS["batch_size"], "--batch-size", help="windows per SGLD minibatch", callback=positive_int
    ),
    seed: int = typer.Option(0, "--seed", callback=non_negative_int),
    out: Path = typer.Option(
        None, "--out", "-o", help="output folder (default RUN_DIR/llc)", callback=out_folder
    ),
    threads: int = threads_param(help="torch CPU threads"),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="run the SGLD steps through torch.compile: ~1.3-1.5x per step on CPU after a one-time compile "
        "of ~1 min per architecture (shared by the checkpoints); pays on long runs",
    ),
) -> None:
    """Estimate the local learning coefficient (SGLD) of every checkpoint, in total and per component, on the
    run's own training data. Resumable: checkpoints already estimated with the same settings are skipped."""
    set_threads(threads)
    import warnings

    from interplab import runs
    from interplab.dynamics.llc import LLCConvergenceWarning, SGLDConfig, SGLDDivergence, default_nbeta
    from interplab.dynamics.run import join_formation, llc_along_run

    folder = claim_out(out or run_dir / LLC, Kind.LLC)
    try:
        config = SGLDConfig(
            step_size=step_size,
            gamma=gamma,
            nbeta=nbeta,
            chains=chains,
            draws=draws,
            burn_in=burn_in,
            batch_size=batch_size,
            seed=seed,
        )
        chosen = None
        if steps is not None:
            try:
                chosen = [int(s) for s in steps.split(",") if s.strip()]
            except ValueError:
                fail(f"--steps must be comma-separated integers, got {steps!r}")
        if every > 1:
            have = [c.step for c in runs.TrainRun.open(run_dir).checkpoints()]
            have = [s for s in have if chosen is None or s in chosen]
            chosen = sorted(set(have[::every]) | set(have[-1:]))
        with JobProgress("llc", unit="checkpoints") as bar, warnings.catch_warnings():
            # each unmixed estimate is listed once below the table, not as a warning per estimate
            warnings.simplefilter("ignore", LLCConvergenceWarning)
            result = llc_along_run(
                run_dir,
                config,
                components=component,
                n_seqs=seqs,
                seq_len=seq_len,
                steps=chosen,
                out=folder,
                progress=bar,
                compile=compile,
            )
    except SGLDDivergence as err:
        fail(f"{err} (the checkpoints finished before are kept in {folder})")
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    paths = result.save(folder)
    table = Table(title="local learning coefficient per checkpoint")
    table.add_column("step", justify="right")
    table.add_column("L(w*)", justify="right")
    for c in result.components:
        table.add_column(f"LLC {c}", justify="right")
        table.add_column(f"R-hat {c}", justify="right")
        table.add_column(f"ESS bulk/tail {c}", justify="right")
    for i, step in enumerate(result.steps):
        cells = [str(step), f"{result.init_loss[i]:.3f}"]
        for c in result.components:
            cells += [f"{result.llc[c][i]:.3g} ± {result.se[c][i]:.2g}", *result.diagnostic_cells(c, i)]
        table.add_row(*cells)
    console.print(table)
    bad = result.not_mixed()
    if bad:
        console.print(
            f"{result.mixing_summary()} (* in the table): {', '.join(f'step {s} {c}' for s, c, _ in bad[:12])}"
            + (" ..." if len(bad) > 12 else "")
            + f". Check the loss traces (RunLLC.trace_plot(step, component)); raise --draws (now {draws}) or "
            f"--burn-in (now {burn_in}), or lower --step-size (now {step_size:g})",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
    local = result.locality_summary()
    if local:
        tokens = seqs * result.data["seq_len"]
        console.print(
            f"{local}. Localise the chains: raise --nbeta (now {result.nbeta:.3g}; the loss is a mean over "
            f"{tokens} tokens, whose n / log n is {default_nbeta(tokens):.3g}) or --gamma (now {gamma:g})",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
    if result.resumed:
        console.print(f"{len(result.resumed)} checkpoints read back from {folder / runs.LLC_ESTIMATES}")
    console.print(result.summary())
    console.print(f"report: {paths['report']}\ntable: {paths['table']}\ninteractive plot: {paths['html']}")
    if paths["png"]:
        console.print(f"picture: {paths['png']}")
    else:
        console.print(paths["png_error"], style="yellow", markup=False, soft_wrap=True)
    joined = join_formation(run_dir, result) if out is None else None
    if joined is not None:
        console.print(
            f"beside the induction scores: {joined['html']}" + (f", {joined['png']}" if joined["png"] else "")
        )
    elif out is None:
        print_command("next: ", "formation", run_dir, note="  (draws the LLC beside the induction scores)")


def register(app: typer.Typer) -> None:
    app.command("llc")(llc_command)
