#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU: what CI runs. On a fresh machine it installs what
# the tests need (.venv with the test extras; Debian's chromium for the browser tests where it may, see
# scripts/browser-deps.sh; Debian's postgresql for the feature database's PostgreSQL tests, see
# scripts/postgres-deps.sh); a test that needs what cannot be had here skips and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/browser-deps.sh
bash scripts/postgres-deps.sh
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Test files run side by side in INTERPLAB_TEST_WORKERS pytest-xdist processes (default: one per CPU core, at most
# 4), each file whole on one worker (--dist loadfile: a module's fixtures are built once), with the cores shared
# out as torch threads (INTERPLAB_TEST_THREADS, read by tests/conftest.py). INTERPLAB_TEST_WORKERS=1 runs in one
# process, as before. A command line that names -n/--numprocesses itself is left as it is.
cores=$(nproc 2>/dev/null || echo 1)
workers=${INTERPLAB_TEST_WORKERS:-$((cores < 4 ? cores : 4))}
case "$workers" in '' | *[!0-9]* | 0) echo "scripts/test.sh: INTERPLAB_TEST_WORKERS must be a positive integer, got '$workers'" >&2; exit 2 ;; esac
parallel=()
if [ "$workers" -gt 1 ] && [[ " $* " != *" -n "* && " $* " != *" --numprocesses"* && " $* " != *" -n="* ]]; then
  parallel=(-n "$workers" --dist loadfile)
  export INTERPLAB_TEST_THREADS=${INTERPLAB_TEST_THREADS:-$((cores / workers > 1 ? cores / workers : 1))}
fi
# --durations: the 40 slowest tests at the end of the log, to see where the suite's time goes
exec .venv/bin/python -m pytest -q -rs --durations=40 "${parallel[@]}" "$@"
