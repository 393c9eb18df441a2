#!/usr/bin/env bash
# Build the peer environments that the compatibility tests and benchmarks compare against, each in its own venv
# under .peers/ (never in .venv): TransformerLens 3.9 (HookedTransformer) and sae_lens. CPU torch is installed
# first, pinned, so no peer pulls a CUDA build. Idempotent; prints the variables the tests read.
#   bash scripts/peers.sh            # build both
#   bash scripts/peers.sh tl         # only TransformerLens
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want=${1:-all}
build() {  # name, package spec, import name
  local dir=".peers/$1" spec=$2 mod=$3
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import $mod" 2>/dev/null; then return; fi
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q "torch==2.13.0"
  "$dir/bin/pip" install -q "torch==2.13.0" "$spec"
  "$dir/bin/python" -c "import $mod"
}
if [ "$want" = all ] || [ "$want" = tl ]; then build tl "transformer-lens==3.9.0" transformer_lens; fi
if [ "$want" = all ] || [ "$want" = saelens ]; then build saelens "sae-lens" sae_lens; fi
echo "INTERPLAB_TL_PYTHON=$PWD/.peers/tl/bin/python"
echo "INTERPLAB_SAELENS_PYTHON=$PWD/.peers/saelens/bin/python"
