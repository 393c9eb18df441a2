"""The ``interplab`` command. Each module in this package that defines ``register(app)`` adds its commands,
so command groups live in their own files and import their heavy dependencies lazily.

Every command runs inside one error boundary (`ErrorBoundary`): a bad argument or an error the library
raises ends the command with one line ``error: ...`` on stderr, exit code 2 for bad input and 1 for a job
that failed; a traceback only with ``interplab --debug ...`` (or ``INTERPLAB_DEBUG=1``)."""

from __future__ import annotations

import importlib
import os
import pkgutil

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x ships its own copy of click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as cx  # type: ignore[no-redef]

import interplab.cli
from interplab.cli.common import CommandError, UsageError
from interplab.sae.disk_store import ActivationDataError

DEBUG_HINT = "rerun with --debug for the traceback"

# What the library raises for input it refuses (a bad value, an unknown name, a missing or damaged file):
# bad input, exit code 2. Anything else it raises on purpose is a job that failed: exit code 1.
_BAD_INPUT = (
    ValueError,
    LookupError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)
_FAILED = (OSError, RuntimeError, ArithmeticError, ImportError, MemoryError)


# Errors about the data a job read (NaN activations ...): found while it ran, so exit code 1.
_DATA_ERRORS: tuple[type[BaseException], ...] = (ActivationDataError,)


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) quotes its message
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__  # one line, whatever the message held


def describe(err: BaseException, command: str = "interplab") -> tuple[int, str]:
    """The exit code and the one line printed for an exception that ended a command."""
    if isinstance(err, cx.UsageError):
        return 2, f"error: {' '.join(err.format_message().split())} (see '{command} --help')"
    if isinstance(err, (UsageError, CommandError)):
        return err.exit_code, f"error: {_message(err)}"
    if isinstance(err, _DATA_ERRORS):
        return 1, f"error: {_message(err)} ({DEBUG_HINT})"
    if isinstance(err, _BAD_INPUT):
        return 2, f"error: {_message(err)} ({DEBUG_HINT})"
    if isinstance(err, _FAILED):
        return 1, f"error: {_message(err)} ({DEBUG_HINT})"
    return 1, f"error: unexpected {type(err).__name__}: {_message(err)} (a bug in interplab; {DEBUG_HINT})"


def debug_enabled(ctx: typer.Context | None) -> bool:
    if os.environ.get("INTERPLAB_DEBUG", "").strip() not in ("", "0"):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and root.params.get("debug"))


def _report(err: Exception, ctx: typer.Context | None, args: list[str] | None = None) -> None:
    """Print the one line for ``err`` and exit (re-raise it with --debug)."""
    if debug_enabled(ctx):
        raise err
    _name_the_value(err, args or [])
    command = err.ctx.command_path if isinstance(err, cx.UsageError) and err.ctx else "interplab"
    code, line = describe(err, command)
    typer.echo(typer.style("error:", fg="red", bold=True) + line[len("error:") :], err=True)
    raise typer.Exit(code) from None


# exits, aborts and `interplab sae` without a command (which shows the help) pass through
def _name_the_value(err: Exception, args: list[str]) -> None:
    """A value typer could not convert (``--steps abc``) is named in the message, taken from the command line."""
    param = getattr(err, "param", None)
    if not isinstance(err, cx.BadParameter) or param is None or getattr(err, "_named", False):
        return
    opts = list(getattr(param, "opts", []) or [])
    for i, arg in enumerate(args):
        for opt in opts:
            raw = arg[len(opt) + 1 :] if arg.startswith(opt + "=") else None
            if arg == opt and i + 1 < len(args):
                raw = args[i + 1]
            if raw is not None and raw not in err.message:
                err.message = f"{raw!r}: {err.message}"
                err._named = True  # type: ignore[attr-defined]
                return


_PASS = tuple(
    {
        typer.Exit,
        typer.Abort,
        *(getattr(cx, n) for n in ("Exit", "Abort", "NoArgsIsHelpError") if hasattr(cx, n)),
    }
)


class ErrorBoundary(TyperGroup):
    """The root group: runs the chosen command and turns any exception into one line and an exit code."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # options of `interplab` itself (--debug, or a typo before the command)
            return super().make_context(info_name, args, parent=parent, **extra)
        except _PASS:
            raise
        except cx.UsageError as err:
            _report(err, None)

    def invoke(self, ctx: typer.Context):  # type: ignore[override]
        args = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        try:
            return super().invoke(ctx)
        except _PASS:
            raise
        except Exception as err:
            _report(err, ctx, args)


app = typer.Typer(
    name="interplab",
    help="interplab: a laboratory for mechanistic interpretability.",
    cls=ErrorBoundary,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="show the full traceback of an error (also: INTERPLAB_DEBUG=1)"
    ),
) -> None:
    """interplab: a laboratory for mechanistic interpretability."""


def _register_all() -> None:
    for info in sorted(pkgutil.iter_modules(interplab.cli.__path__), key=lambda i: i.name):
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
