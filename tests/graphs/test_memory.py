"""`estimate_bytes` (the budget `attribute` checks) against the measured peak resident memory of a graph and its
pruning, in a fresh process (tests/graphs/memory_probe.py): an upper bound, and not a loose one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_estimate_bounds_the_measured_peak():
    # 12 tokens, ~2,800 active features: the adjacency (33 MB) and pruning's copy of it dominate
    spec = {"model": "tiny", "length": 12, "d_sae": 256}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.graphs.memory_probe", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_features"] > 2000
    measured, estimate = out["measured_bytes"], out["estimate_bytes"]
    assert measured <= estimate <= 1.5 * measured, out
