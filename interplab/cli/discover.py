"""``interplab discover --model DIR --task NAME --method eap|eap-ig|eap-ig-activations|clean-corrupted|acdc|ugs|
hard-concrete``: automatic circuit discovery to a run folder, with MIB's faithfulness metrics (CPR, CMD) for score
methods (all but ACDC; ugs and hard-concrete learn edge masks, `interplab.circuits.masks`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from interplab.circuits import Attribution, Circuit, EdgeScores, acdc, attribute, eap_circuit, scores_circuit
from interplab.circuits.masks import MaskConfig, learn_masks
from interplab.circuits.masks import Method as MaskMethod
from interplab.circuits.metrics import MIB_FRACTIONS, circuit_metrics
from interplab.cli.common import (
    JobProgress,
    claim_out,
    console,
    fail,
    library_default,
    non_negative_float,
    out_folder,
    positive_int,
    set_threads,
    threads_param,
)
from interplab.cli.scrub import MODEL_HELP, load_any_model
from interplab.runs import CONFIG, METRICS_JSON, Kind, write_json
from interplab.scrub.tasks import build_task, discovery_task


class Method(str, Enum):
    EAP = "eap"
    EAP_IG = "eap-ig"
    EAP_IG_ACTIVATIONS = "eap-ig-activations"
    CLEAN_CORRUPTED = "clean-corrupted"
    ACDC = "acdc"
    UGS = "ugs"
    HARD_CONCRETE = "hard-concrete"


MASK_METHODS = {Method.UGS: MaskMethod.UGS, Method.HARD_CONCRETE: MaskMethod.HARD_CONCRETE}


def parse_sizes(value: str | None) -> tuple[float, ...] | None:
    """Typer callback for ``--sizes``: ``mib`` (MIB's ten fractions), ``none``, or comma-separated fractions."""
    if value is None or value.strip().lower() == "mib":
        return MIB_FRACTIONS
    if value.strip().lower() == "none":
        return ()
    try:
        sizes = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give 'mib', 'none' or fractions like 0.01,0.1,1") from None
    if not sizes or any(not 0 < f <= 1 for f in sizes) or list(sizes) != sorted(set(sizes)):
        raise typer.BadParameter(f"{value!r}: fractions must be distinct, ascending and in (0, 1]")
    return sizes


def discover_command(
    model_path: Path = typer.Option(None, "--model", help=MODEL_HELP),
    task: str = typer.Option(..., "--task", help="task name: parens or induction"),
    method: Method = typer.Option(
        Method.EAP,
        "--method",
        help="eap, eap-ig (inputs), eap-ig-activations, clean-corrupted, acdc, ugs or hard-concrete (learned masks)",
    ),
    data: Path = typer.Option(None, "--data", help="task data (parens: the paren_balancer fixture folder)"),
    out: Path = typer.Option(Path("runs/discover"), "--out", help="run folder to write", callback=out_folder),
    n: int = typer.Option(
        library_default(discovery_task, "n"),
        "--n",
        help="clean (and as many corrupted) examples",
        callback=positive_int,
    ),
    k: int = typer.Option(
        library_default(eap_circuit, "k"),
        "--k",
        help="score methods: the circuit of report.json keeps the k edges of largest |score|",
        callback=positive_int,
    ),
    steps: int = typer.Option(
        library_default(attribute, "steps"),
        "--steps",
        help="EAP-IG: interpolation steps",
        callback=positive_int,
    ),
    sizes: str = typer.Option(
        "mib",
        "--sizes",
        help="score methods: circuit sizes for MIB's CPR/CMD (metrics.json, metrics.html): 'mib' (its ten "
        "fractions of the edges), comma-separated fractions, or 'none'",
        callback=parse_sizes,
    ),
    lam: float = typer.Option(
        MaskConfig.lam, "--lam", help="ugs, hard-concrete: sparsity weight", callback=non_negative_float
    ),
    mask_steps: int = typer.Option(
        MaskConfig.steps, "--mask-steps", help="ugs, hard-concrete: optimiser steps", callback=positive_int
    ),
    threshold: float = typer.Option(
        library_default(acdc, "threshold"),
        "--threshold",
        help="ACDC: KL increase below which an edge is removed",
        callback=non_negative_float,
    ),
    threads: int = threads_param(1, "torch threads"),
) -> None:
    """Find a circuit; writes report.json and report.html (with the graph) and, for score methods,
    metrics.json and metrics.html (MIB's faithfulness curves, CPR and CMD)."""
    fractions: tuple[float, ...] = sizes  # type: ignore[assignment]  # parse_sizes made it a tuple
    set_threads(threads)
    claim_out(out, Kind.DISCOVERY, Kind.CIRCUIT)
    try:
        model = load_any_model(model_path, task, data)
        dtask = discovery_task(build_task(task, model, data=data, n_rows=max(4 * n, 1000)), n)
    except (FileNotFoundError, ValueError, KeyError) as err:
        fail(str(err))
    circuit: Circuit
    metrics = None
    if method is Method.ACDC:
        with JobProgress("discover acdc", unit="edges") as bar:
            circuit = acdc(model, dtask, threshold, progress=bar)
    else:
        engine = dtask.engine(model)
        scores: EdgeScores
        if method in MASK_METHODS:
            config = MaskConfig(method=MASK_METHODS[method], lam=lam, steps=mask_steps)
            with JobProgress(f"discover {method.value}", unit="steps") as bar:
                scores = learn_masks(model, dtask, config, engine=engine, progress=bar)
        else:
            scores = attribute(model, dtask, Attribution(method.value), steps=steps, engine=engine)
        circuit = scores_circuit(engine, dtask, scores, k)
        if fractions:
            metrics = circuit_metrics(model, dtask, scores, fractions=fractions, engine=engine)
    # the circuit is found: only now is the run folder written (a failed discovery leaves nothing behind)
    write_json(
        out / CONFIG,
        Kind.DISCOVERY,
        {
            "model": str(model_path),
            "task": task,
            "method": method.value,
            "n": n,
            "k": k,
            "threshold": threshold,
            "steps": steps,
            "lam": lam,
            "mask_steps": mask_steps,
            "sizes": list(fractions),
        },
    )
    circuit.save(out)
    if metrics is not None:
        metrics.save(out)
    f = circuit.faithfulness
    console.print(repr(circuit))
    console.print(
        f"metric: full {f.metric_full:.4g}, circuit {f.metric_circuit:.4g}, corrupted {f.metric_corrupt:.4g}"
    )
    for e in circuit.edges:
        console.print(f"  {e}")
    if metrics is not None:
        console.print(repr(metrics))
        for name, curve in metrics.curves.items():
            points = ", ".join(
                f"{f:g}:{v:.2f}" for f, v in zip(curve.fractions, curve.faithfulness, strict=True)
            )
            console.print(f"  {name} ranking, f by size: {points}")
        console.print(f"wrote {out / METRICS_JSON} and {out / 'metrics.html'}")
    console.print(f"wrote {out / 'report.json'}, {out / 'report.html'} and {out / CONFIG}")


def register(app: typer.Typer) -> None:
    app.command("discover")(discover_command)
