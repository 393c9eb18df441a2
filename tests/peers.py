"""The peer packages the compatibility tests compare against (TransformerLens 3.9, sae_lens, auto-circuit 1.0.1,
circuit-tracer 0.5.0, kronfluence 1.0.1, devinterp 2.0.1, sae-bench 0.6.0).

Each peer lives in its own virtual environment, never in the test environment, and runs in a subprocess:
``bash scripts/peers.sh`` builds them under ``.peers/`` (CI does, in .ci/run). A test asks for a peer's
interpreter with `peer_python`: the variable (``INTERPLAB_TL_PYTHON``, ``INTERPLAB_SAELENS_PYTHON``,
``INTERPLAB_AUTOCIRCUIT_PYTHON``, ``INTERPLAB_CIRCUITTRACER_PYTHON``, ``INTERPLAB_KRONFLUENCE_PYTHON``,
``INTERPLAB_DEVINTERP_PYTHON``, ``INTERPLAB_SAEBENCH_PYTHON``) when set, else ``.peers/<name>/bin/python``;
without one the test is skipped with the reason, or fails when ``INTERPLAB_REQUIRE_PEERS=1`` (CI), so a broken
peer build cannot pass as a skip.
"""

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = {
    "tl": ("INTERPLAB_TL_PYTHON", "transformer_lens"),
    "saelens": ("INTERPLAB_SAELENS_PYTHON", "sae_lens"),
    "autocircuit": ("INTERPLAB_AUTOCIRCUIT_PYTHON", "auto_circuit.prune"),
    "circuittracer": (
        "INTERPLAB_CIRCUITTRACER_PYTHON",
        "circuit_tracer.replacement_model.replacement_model_transformerlens",
    ),
    "saebench": ("INTERPLAB_SAEBENCH_PYTHON", "sae_bench.evals.core.main"),
    "devinterp": ("INTERPLAB_DEVINTERP_PYTHON", "devinterp.slt.llc"),
    "kronfluence": ("INTERPLAB_KRONFLUENCE_PYTHON", "kronfluence.analyzer"),
    "logix": ("INTERPLAB_LOGIX_PYTHON", "logix"),
    "bergson": ("INTERPLAB_BERGSON_PYTHON", "bergson.collector.in_memory_collector"),
}
# peers that `bash scripts/peers.sh` (CI's set) does not build: their tests skip even under INTERPLAB_REQUIRE_PEERS=1
OPTIONAL = {"logix", "bergson"}


@functools.cache
def _problem(python: str, module: str) -> str | None:
    if not Path(python).exists():
        return f"{python} does not exist"
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"{python} cannot import {module}: {done.stderr.strip()[-300:]}"


def peer_python(name: str) -> str:
    """The interpreter of peer ``name`` (a key of `PEERS`); skips (or, under INTERPLAB_REQUIRE_PEERS=1, fails)
    the calling test when it is missing or broken."""
    var, module = PEERS[name]
    python = os.environ.get(var) or str(ROOT / ".peers" / name / "bin" / "python")
    problem = _problem(python, module)
    if problem is None:
        return python
    reason = f"{module} peer unavailable ({problem}): run `bash scripts/peers.sh {name}` or set {var}"
    if os.environ.get("INTERPLAB_REQUIRE_PEERS") == "1" and name not in OPTIONAL:
        pytest.fail(reason)
    pytest.skip(reason)


def peer_env() -> dict[str, str]:
    """The environment for a peer subprocess: one quiet CPU thread, offline."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_runner(
    python: str, runner: Path, folder: Path, *, name: str, env: dict[str, str] | None, timeout: float
) -> dict[str, Any]:
    """Run a peer's runner script (``benchmarks/_NAME_peer.py``) on ``folder`` in the peer's interpreter; its
    report, the JSON of its last stdout line. A failed run raises RuntimeError naming the peer, with its stderr."""
    done = subprocess.run(
        [python, str(runner), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} peer failed (exit {done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
