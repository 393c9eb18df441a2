"""``interplab serve``: the feature explorer web app on this machine (127.0.0.1 by default)."""

from __future__ import annotations

from pathlib import Path

import typer

from interplab.cli.common import (
    DB_ERRORS,
    console,
    db_source,
    err_console,
    fail,
    model_arg_source,
    port_option,
)
from interplab.runs import RunError, pick_sae
from interplab.web.guard import is_loopback


def serve(
    db: list[str] = typer.Option(
        [],
        "--db",
        help="feature database: a file or a URL (postgresql://user@host/dbname); repeat for several, e.g. one "
        "per SAE or layer",
    ),
    runs: list[Path] = typer.Option(
        [], "--runs", help="folder of run directories, models and SAEs (repeatable)"
    ),
    model: Path = typer.Option(None, "--model", help="model for attention views and steering"),
    sae: Path = typer.Option(
        None,
        "--sae",
        help="SAE for steering: its folder, or a run holding one (default: the one recorded in the database)",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to bind (loopback unless you mean otherwise)"
    ),
    port: int = typer.Option(8000, "--port", callback=port_option),
    allow_host: list[str] = typer.Option(
        [],
        "--allow-host",
        help="a host name (besides localhost, 127.0.0.1, [::1]) that browsers may use to reach the app, "
        "e.g. this machine's name on your network (repeatable)",
    ),
) -> None:
    """Browse feature databases, runs and attention patterns in the browser."""
    import uvicorn  # the web stack is imported by this command only

    from interplab.web.app import create_app
    from interplab.web.guard import SERVER_OPTIONS

    if not db and not runs:
        fail("give at least one --db FILE or --runs DIR")
    dbs = [source for source in map(db_source, db) if source is not None]
    for r in runs:
        if not r.is_dir():
            fail(f"--runs {r} is not a folder")
    if model is not None:  # resolved (a training run: its final/) and checked now, loaded on first use
        source = model_arg_source(model, "--model: ")
        if source != model:
            console.print(
                f"model {source} (loaded on first use)", markup=False, highlight=False, soft_wrap=True
            )
        model = source
    if sae is not None:
        try:
            sae = pick_sae(sae)
        except RunError as err:
            fail(f"--sae: {err}")
    allowed = list(allow_host)
    if host not in ("0.0.0.0", "::", "") and not is_loopback(host.strip("[]")):
        allowed.append(host)  # the address it binds is a name browsers use to reach it
    try:
        app = create_app(dbs, runs=runs, model=model, sae=sae, allowed_hosts=allowed)
    except DB_ERRORS as err:
        fail(str(err))
        return
    if not is_loopback(host.strip("[]")):
        err_console.print(f"[yellow]warning:[/] serving on {host}: other machines can reach this app")
        if not allow_host and host in ("0.0.0.0", "::", ""):
            err_console.print(
                "only loopback names are answered: add --allow-host NAME for each name others use to reach it"
            )
    console.print(f"interplab feature explorer on http://{host}:{port}/  (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, **SERVER_OPTIONS)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
