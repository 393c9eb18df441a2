#!/usr/bin/env bash
# Set up (if needed) and run the demo: the main job of interplab on this machine's CPU.
# It does not activate .venv: the commands it prints start with .venv/bin/interplab, which runs as printed
# from the repository root (or `source .venv/bin/activate` once, then type `interplab ...`).
set -euo pipefail
here="$(pwd)"
cd "$(dirname "$0")/.."
root="$(pwd)"
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
status=0
.venv/bin/interplab demo "$@" || status=$?
if [ "$here" != "$root" ]; then
  printf '(the paths and commands above are relative to %q: run them after  cd %q)\n' "$root" "$root"
fi
exit "$status"
