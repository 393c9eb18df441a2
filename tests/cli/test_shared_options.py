"""The options many commands share (``--seq-len``, ``--batches``, ``--threads``, ``--split``) are defined once
(`interplab.cli.common`) and so check their value the same way in every command that has them: a copy that
lost its check, or whose help no longer says what the command does, fails here. The commands are found by
walking the CLI, so a new command is checked without being listed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from interplab.cli.common import EVAL_BATCH_SEQS
from interplab.cli.main import app

# flag -> (a value every command must refuse, what the refusal says)
REFUSED = {
    "--seq-len": ("0", "is not a positive integer"),
    "--batches": ("0", "is not a positive integer"),
    "--threads": ("-1", "is not a thread count"),
    "--split": ("test", "is not one of: train, validation"),
}


def commands(group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for name, cmd in sorted(group.commands.items()):
        sub = getattr(cmd, "commands", None)
        if sub is not None:
            yield from commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def options(cmd) -> dict[str, object]:
    return {opt: p for p in cmd.params for opt in getattr(p, "opts", [])}


CASES = [(path, flag) for path, cmd in commands(get_command(app)) for flag in REFUSED if flag in options(cmd)]


def test_the_shared_options_are_found_in_many_commands():
    found = {flag: [p for p, f in CASES if f == flag] for flag in REFUSED}
    assert all(len(paths) >= 2 for paths in found.values()), found
    assert ("sae", "eval") in found["--seq-len"] and ("sae", "bench") in found["--batches"]


@pytest.mark.parametrize(("path", "flag"), CASES, ids=[" ".join(p) + " " + f for p, f in CASES])
def test_every_command_refuses_the_same_bad_value_of_a_shared_option(path, flag):
    bad, says = REFUSED[flag]
    result = CliRunner().invoke(app, [*path, flag, bad])
    assert result.exit_code == 2, result.output
    assert flag in result.output and says in " ".join(result.output.split()), result.output


def test_batches_help_says_the_batch_size_the_evaluations_use():
    for path, cmd in commands(get_command(app)):
        opt = options(cmd).get("--batches")
        if opt is not None:
            assert opt.help == f"batches of {EVAL_BATCH_SEQS} sequences", path
