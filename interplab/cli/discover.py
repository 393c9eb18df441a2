"""``interplab discover --model DIR --task NAME --method eap|acdc``: automatic circuit discovery to a run folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from interplab.circuits import Circuit, acdc, eap_circuit
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


def discover_command(
    model_path: Path = typer.Option(None, "--model", help=MODEL_HELP),
    task: str = typer.Option(..., "--task", help="task name: parens or induction"),
    method: Method = typer.Option(Method.EAP, "--method", help="eap or acdc"),
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
        help="EAP: keep the k highest-scoring edges",
        callback=positive_int,
    ),
    threshold: float = typer.Option(
        library_default(acdc, "threshold"),
        "--threshold",
        help="ACDC: KL increase below which an edge is removed",
        callback=non_negative_float,
    ),
    threads: int = typer.Option(1, "--threads", help="torch threads", callback=threads_option),
) -> None:
    """Find a circuit with EAP or ACDC; writes report.json and report.html (with the graph)."""
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
    else:
        with JobProgress("discover acdc", unit="edges") as bar:
            circuit = acdc(model, dtask, threshold, progress=bar)
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
