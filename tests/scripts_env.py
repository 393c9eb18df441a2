"""Running the docs' snippets and the examples the way a user would: a fresh interpreter, offline, one thread."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the shared folder beside the checkout (CI: a fresh clone with ../shared next to it); overridable for worktrees
SHARED = Path(os.environ.get("INTERPLAB_SHARED", ROOT.parent / "shared")).resolve()


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a user's fresh process: the checkout importable, no network, one CPU thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(
        OMP_WAIT_POLICY="PASSIVE",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPLBACKEND="Agg",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_python(args: list[str], cwd: Path, timeout: float, **extra_env: str) -> subprocess.CompletedProcess:
    """Run `python ARGS` in `cwd`; on timeout, raise AssertionError with what the process printed so far."""
    try:
        return subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=script_env(**extra_env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(
            f"timed out after {timeout:.0f} s\n--- stdout\n{tail(out)}\n--- stderr\n{tail(err)}"
        ) from None


def tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]
