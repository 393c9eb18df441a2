"""``interplab info PATH``: architecture, parameter count and hook points with shapes."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from interplab.cli.common import console, fail, load_model_arg
from interplab.model import ModelConfig, Positional, Transformer


def builtin_model() -> Transformer:
    """A small randomly initialised model (for ``interplab info --builtin`` and quick tries)."""
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(
            d_model=128,
            n_layers=2,
            n_heads=4,
            d_vocab=1024,
            n_ctx=256,
            positional=Positional.ROTARY,
            attn_only=True,
            smear_keys=True,
            name="builtin-2l",
        )
    )


def info(
    path: Path = typer.Argument(
        None, help="model folder or file (interplab, Hugging Face or TransformerLens), or a training run"
    ),
    builtin: bool = typer.Option(False, "--builtin", help="describe a small built-in random model instead"),
    hooks: bool = typer.Option(True, "--hooks/--no-hooks", help="list the hook points with their shapes"),
) -> None:
    """Print a model's architecture, parameter count and hook points with shapes."""
    if builtin:
        model = builtin_model()
    elif path is None:
        fail("give a model PATH or --builtin")
        return
    else:
        model = load_model_arg(path)
    cfg = model.cfg
    table = Table(title=repr(model), show_header=True)
    table.add_column("field")
    table.add_column("value")
    for key, value in cfg.to_dict().items():
        table.add_row(key, str(value))
    console.print(table)
    console.print(f"parameters: {model.n_params:,}")
    if hooks:
        shapes = model.hook_shapes(batch=1, pos=4)
        t = Table(title="hook points (batch 1, pos 4)")
        t.add_column("hook point")
        t.add_column("shape")
        for name in model.hook_names:
            if name in shapes:
                t.add_row(name, str(list(shapes[name])))
        console.print(t)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
