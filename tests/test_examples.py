"""Every `examples/*.py` runs to the end, as a user would run it, on tiny settings.

Each example runs in a fresh interpreter with `INTERPLAB_EXAMPLES_FAST=1` (examples slower than ~60 s read it
and shrink themselves), in an empty folder whose sibling `../shared` is the real shared folder, so the
examples' default fixture paths resolve as they do beside a checkout. An example that needs something it
cannot make (a trained run) exits with code 77, which is reported as a skip with the example's own message.
"""

import re
from pathlib import Path

import pytest

from tests.scripts_env import ROOT, SHARED, run_python, tail

TIMEOUT_S = 300  # each example takes under ~60 s in fast mode; the margin is for a loaded CI machine
SKIPPED = 77
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_examples_found():
    assert EXAMPLES, "examples/ has no scripts"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_percent_format(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# %%"), f"{path.name}: a percent-format script starts with a '# %%' cell marker"
    assert len(re.findall(r"^# %%(?! \[markdown\])", text, re.M)) >= 1, f"{path.name} has no code cell"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path, tmp_path: Path):
    text = path.read_text(encoding="utf-8")
    if "../shared" in text:
        if not SHARED.is_dir():
            pytest.skip(f"{path.name} reads ../shared, absent here ({SHARED}); set INTERPLAB_SHARED")
        (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    done = run_python([str(path)], cwd=work, timeout=TIMEOUT_S, INTERPLAB_EXAMPLES_FAST="1")
    if done.returncode == SKIPPED:
        pytest.skip(
            f"{path.name}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'skipped'}"
        )
    assert done.returncode == 0, (
        f"examples/{path.name} failed with exit code {done.returncode}\n"
        f"--- stdout\n{tail(done.stdout)}\n--- stderr\n{tail(done.stderr)}"
    )
