#!/usr/bin/env bash
# Set up (if needed) and run the demo: the main job of interplab on this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/interplab demo "$@"
