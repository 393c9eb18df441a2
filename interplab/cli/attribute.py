"""``interplab attribute RUN_DIR``: which training examples built a mechanism (e.g. the induction head)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from interplab.cli.common import (
    JobProgress,
    claim_out,
    console,
    fail,
    library_default,
    out_folder,
    positive_int,
    set_threads,
    threads_option,
)
from interplab.data_attribution.run import attribute_run
from interplab.runs import ATTRIBUTION, Kind


def attribute(
    run_dir: Path = typer.Argument(..., help="a training run folder (interplab train)"),
    target: str = typer.Option(
        library_default(attribute_run, "target"),
        help="induction:L.H | prev:L.H | composition:k:L1.H1->L2.H2 | "
        "induction:best (the head with the highest final score) | neuron:L.N | loss (held-out sequences) | "
        "loss:QUERY_FILE (a text file) | feature:SAE_PATH:IDX; for a loss, helpful examples score negative",
    ),
    window: str = typer.Option(
        library_default(attribute_run, "window"),
        help="'auto' (where the target forms) or START:STOP checkpoint steps",
    ),
    group: str = typer.Option(
        library_default(attribute_run, "group"),
        help="parameter group: all, layer:L, head:L.H, neuron:L.N, ...",
    ),
    dim: int = typer.Option(
        library_default(attribute_run, "dim"),
        help="projection dimension of the gradients (--grads exact only)",
        callback=positive_int,
    ),
    candidates: int = typer.Option(
        library_default(attribute_run, "max_candidates"),
        help="at most this many training sequences from the window are scored",
        callback=positive_int,
    ),
    grads: str = typer.Option(
        library_default(attribute_run, "grads"),
        help="factored (default): the exact, unprojected dot products of each sequence's gradient with the "
        "target's over the whole group, from the layers' inputs and output gradients (1.8-2.8x faster than "
        "exact); exact: per-example gradients of the group, then a sparse JL projection to --dim, a random "
        "projection whose noise (about 1/sqrt(dim) of the norms: 1/32 at 1024) can swamp the tiny cosines "
        "early in a run",
    ),
    out: Path = typer.Option(
        None, help="output folder (default RUN_DIR/attribution/TARGET)", callback=out_folder
    ),
    threads: int = typer.Option(None, help="torch threads", callback=threads_option),
) -> None:
    """Attribute a mechanism's formation to the training sequences that built it (TracIn over checkpoints)."""
    set_threads(threads)
    if out is not None:
        claim_out(out, Kind.ATTRIBUTION)
    if window == "auto":
        win: str | tuple[int, int] = "auto"
    else:
        try:
            a, b = window.split(":")
            win = (int(a), int(b))
        except ValueError:
            fail(f"--window must be 'auto' or START:STOP, got {window!r}")
    try:
        with JobProgress("attribute", unit="checkpoints") as bar:
            result = attribute_run(
                run_dir,
                target,
                window=win,
                group=group,
                dim=dim,
                max_candidates=candidates,
                grads=grads,
                progress=bar,
            )
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    folder = claim_out(
        out or run_dir / ATTRIBUTION / re.sub(r"[^A-Za-z0-9._-]", "_", result.target.replace("->", "_to_")),
        Kind.ATTRIBUTION,
    )
    paths = result.save(folder)
    console.print(
        f"target [bold]{result.target}[/], window {result.window[0]}..{result.window[1]}, "
        f"{result.example_ids.numel()} candidate sequences"
    )
    if not result.rises:  # the sign convention (docs/attribution.md): helpful = negative
        console.print("a loss target: positive scores raised the loss; the sequences that helped most:")
    console.print(f"ranked {result.ranking}:")
    for rank, (seq, score) in enumerate(result.top(5), 1):
        console.print(f"  #{rank} sequence {seq}: {score:.3g}")
    console.print(
        "over-represented tokens in the top 10%: " + ", ".join(repr(t) for t, _ in result.enriched[:10])
    )
    for kind, path in paths.items():
        console.print(f"{kind}: {path}")


def register(app: typer.Typer) -> None:
    app.command("attribute")(attribute)
