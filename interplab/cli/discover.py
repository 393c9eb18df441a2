"""``interplab discover --model DIR --task NAME --method eap|acdc|ugs|hard-concrete``: automatic circuit discovery to a run folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from interplab.circuits import Circuit, acdc, eap_circuit
from interplab.circuits.masks import MaskConfig, mask_circuit
from interplab.circuits.masks import Method as MaskMethod
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
    threads_option,
)
from interplab.cli.scrub import MODEL_HELP, load_any_model
from interplab.runs import CONFIG, Kind, write_json
from interplab.scrub.tasks import build_task, discovery_task


class Method(str, Enum):
    EAP = "eap"
    ACDC = "acdc"
    UGS = "ugs"
    HARD_CONCRETE = "hard-concrete"


def discover_command(
    model_path: Path = typer.Option(None, "--model", help=MODEL_HELP),
    task: str = typer.Option(..., "--task", help="task name: parens or induction"),
    method: Method = typer.Option(
        Method.EAP, "--method", help="eap, acdc, ugs or hard-concrete (learned edge masks)"
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
        help="EAP, ugs, hard-concrete: keep the k highest-scoring edges",
        callback=positive_int,
    ),
    threshold: float = typer.Option(
        library_default(acdc, "threshold"),
        "--threshold",
        help="ACDC: KL increase below which an edge is removed",
        callback=non_negative_float,
    ),
    lam: float = typer.Option(
        MaskConfig.lam, "--lam", help="ugs, hard-concrete: sparsity weight", callback=non_negative_float
    ),
    steps: int = typer.Option(
        MaskConfig.steps, "--steps", help="ugs, hard-concrete: optimiser steps", callback=positive_int
    ),
    threads: int = typer.Option(1, "--threads", help="torch threads", callback=threads_option),
) -> None:
    """Find a circuit with EAP, ACDC or learned edge masks; writes report.json and report.html (with the graph)."""
    set_threads(threads)
    claim_out(out, Kind.DISCOVERY, Kind.CIRCUIT)
    try:
        model = load_any_model(model_path, task, data)
        dtask = discovery_task(build_task(task, model, data=data, n_rows=max(4 * n, 1000)), n)
    except (FileNotFoundError, ValueError, KeyError) as err:
        fail(str(err))
    circuit: Circuit
    if method is Method.EAP:
        circuit = eap_circuit(model, dtask, k)
    elif method is Method.ACDC:
        with JobProgress("discover acdc", unit="edges") as bar:
            circuit = acdc(model, dtask, threshold, progress=bar)
    else:
        mask_method = MaskMethod.UGS if method is Method.UGS else MaskMethod.HARD_CONCRETE
        config = MaskConfig(method=mask_method, lam=lam, steps=steps)
        with JobProgress(f"discover {method.value}", unit="steps") as bar:
            circuit = mask_circuit(model, dtask, k, config, progress=bar)
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
            "lam": lam,
            "steps": steps,
        },
    )
    circuit.save(out)
    f = circuit.faithfulness
    console.print(repr(circuit))
    console.print(
        f"metric: full {f.metric_full:.4g}, circuit {f.metric_circuit:.4g}, corrupted {f.metric_corrupt:.4g}"
    )
    for e in circuit.edges:
        console.print(f"  {e}")
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("discover")(discover_command)
