"""One child process, measured by itself: what the benchmarks that time a whole ``interplab`` command use."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def timed_process(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run ``cmd`` to completion; its own wall and CPU (user + system) seconds and peak resident memory, from
    ``os.wait4`` (so they are this process's and its waited-for children's alone), with the load before it."""
    load = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "load_avg_before": [round(x, 2) for x in load],
    }
