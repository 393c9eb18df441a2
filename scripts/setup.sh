#!/usr/bin/env bash
# Make .venv with interplab installed (editable) and, with --test, the test dependencies.
# Takes the local CPU build of PyTorch (torch==2.13.0) and never lets an install pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 3))" 2>/dev/null; then
  # install torch first, pinned, so that nothing later asks for a (CUDA) build of its own
  .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q "torch>=2.3"
fi
stamp=".venv/.interplab-installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".${extras}"
  touch "$stamp"
fi
