"""``interplab demo``: the main job. Until training lands it describes a small built-in model."""

from __future__ import annotations

import typer


def demo() -> None:
    """Run the interplab demo."""
    from interplab.cli.info import info

    info(path=None, builtin=True, hooks=True)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
