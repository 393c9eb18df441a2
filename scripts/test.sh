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
# --durations: the 40 slowest tests at the end of the log, to see where the suite's time goes
exec .venv/bin/python -m pytest -q -rs --durations=40 "$@"
