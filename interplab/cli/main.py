"""The ``interplab`` command. Each module in this package that defines ``register(app)`` adds its commands,
so command groups live in their own files and import their heavy dependencies lazily."""

from __future__ import annotations

import importlib
import pkgutil

import typer

app = typer.Typer(
    name="interplab",
    help="interplab: a laboratory for mechanistic interpretability.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _register_all() -> None:
    import interplab.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name in ("main", "common"):
            continue
        module = importlib.import_module(f"interplab.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
