"""``interplab serve``: the feature explorer web app on this machine (127.0.0.1 by default)."""

from __future__ import annotations

from pathlib import Path

import typer

from interplab.cli.common import console, err_console, fail, port_option


def serve(
    db: list[Path] = typer.Option([], "--db", help="feature database (repeat for several)"),
    runs: list[Path] = typer.Option(
        [], "--runs", help="folder of run directories, models and SAEs (repeatable)"
    ),
    model: Path = typer.Option(None, "--model", help="model for attention views and steering"),
    sae: Path = typer.Option(
        None, "--sae", help="SAE for steering (default: the one recorded in the database)"
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to bind (loopback unless you mean otherwise)"
    ),
    port: int = typer.Option(8000, "--port", callback=port_option),
) -> None:
    """Browse feature databases, runs and attention patterns in the browser."""
    import uvicorn

    from interplab.web.app import create_app

    if not db and not runs:
        fail("give at least one --db FILE or --runs DIR")
    for r in runs:
        if not r.is_dir():
            fail(f"--runs {r} is not a folder")
    try:
        app = create_app(db, runs=runs, model=model, sae=sae)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/] serving on {host}: other machines can reach this app")
    console.print(f"interplab feature explorer on http://{host}:{port}/  (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
