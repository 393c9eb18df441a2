"""``interplab info PATH``: a model's architecture, parameter count and hook points with shapes; a dictionary's
(SAE, crosscoder, CLT) kind, the sites it reads, its size and how its training ended."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from interplab import runs
from interplab.cli.common import console, fail, load_model_arg
from interplab.model import ModelConfig, Positional, Transformer

DICTIONARY_FOLDERS = (*runs.DICTIONARY_KINDS, runs.Kind.SAE_TRAIN, runs.Kind.MODEL_DIFF, runs.Kind.CLT_TRAIN)
"""what `interplab info` describes as a dictionary (the folders `interplab.sae.load_dictionary` reads)"""


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
        None,
        help="model folder or file (interplab, Hugging Face or TransformerLens), or a training run; or a "
        "dictionary: an SAE, crosscoder or CLT folder, an SAE training run, a model diff, a CLT training run",
    ),
    builtin: bool = typer.Option(False, "--builtin", help="describe a small built-in random model instead"),
    hooks: bool = typer.Option(True, "--hooks/--no-hooks", help="list the hook points with their shapes"),
    name: str = typer.Option(
        None, "--name", help="which dictionary of a run holding several (an SAE's or checkpoint's name)"
    ),
) -> None:
    """Print a model's architecture, parameter count and hook points with shapes, or what a dictionary (an
    SAE, a crosscoder, a CLT) is: its kind, the sites it reads and writes, its size and its training's end."""
    if path is not None and not builtin and runs.detect(path) in DICTIONARY_FOLDERS:
        show_dictionaries(path, name)
        return
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


def show_dictionaries(path: Path, name: str | None) -> None:
    """The table of the dictionary ``path`` names (every SAE of an SAE training run when no ``--name``)."""
    several = runs.sae_folders(path) if runs.detect(path) is runs.Kind.SAE_TRAIN and name is None else {}
    try:
        infos = [runs.open_dictionary(p) for p in several.values()] or [runs.open_dictionary(path, name)]
    except runs.RunError as err:
        fail(str(err))
    for info in infos:
        table = Table(title=f"{info.path}: {info.kind.label}", show_header=True)
        table.add_column("field")
        table.add_column("value", overflow="fold")
        for key, value in info.rows():
            table.add_row(key, value)
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
