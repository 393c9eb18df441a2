#!/usr/bin/env bash
# Build the peer environments that the compatibility tests and benchmarks compare against, each in its own venv
# under .peers/ (never in .venv): TransformerLens 3.9 (HookedTransformer), sae_lens, auto-circuit 1.0.1 and
# circuit-tracer 0.5.0 (attribution graphs; it brings its own TransformerLens 3.2.1 and nnsight), kronfluence
# 1.0.1 (EK-FAC influence; it brings torchvision, accelerate and safetensors; about 45 s), devinterp 2.0.1 (the
# LLC, tests/dynamics/test_devinterp_peer.py and benchmarks/bench_llc.py) and sae-bench 0.6.0 (SAEBench's core
# metrics, tests/sae/test_bench*_peer.py; 2 GB, about 2.5 minutes). CPU
# torch is installed first, pinned, so no peer pulls a CUDA build (checked after the install). Idempotent: a peer
# whose venv already has the pinned version is kept. Prints the variables the tests read (tests/peers.py also
# finds .peers/<name>/bin/python by itself when they are unset).
#   bash scripts/peers.sh              # build all seven (everything but saedashboard), side by side: what CI runs
#   bash scripts/peers.sh tl           # only TransformerLens
#   bash scripts/peers.sh saelens      # only sae_lens
#   bash scripts/peers.sh autocircuit  # only auto-circuit
#   bash scripts/peers.sh circuittracer  # only circuit-tracer (about 2.5 minutes, 1.6 GB)
#   bash scripts/peers.sh kronfluence  # only kronfluence
#   bash scripts/peers.sh devinterp    # only devinterp
#   bash scripts/peers.sh saebench     # only sae-bench 0.6.0
#   bash scripts/peers.sh saedashboard   # SAEDashboard 0.8.0 for benchmarks/bench_features.py; not in `all`
#   bash scripts/peers.sh dattri       # dattri 0.3.0 for benchmarks/bench_attribution.py (about 1 minute); not in `all`
#   bash scripts/peers.sh logix        # LogIX (logix-ai 0.1.1) for tests/logix_peer.py (about 1 minute, 1 GB); not in `all`
#   bash scripts/peers.sh bergson      # bergson 2.5.1 for tests/bergson_peer.py (about 3 minutes, 1.6 GB); not in `all`
# logix-ai 0.1.1 declares Requires-Python <3.11 but is pure Python; it goes in --no-deps with
# --ignore-requires-python (PIP_IGNORE_REQUIRES_PYTHON) beside its four runtime dependencies.
# bergson 2.5.1 goes in --no-deps with the dependencies its modules import: its declared torchvision (0.28.0)
# does not register its operators with torch 2.13.0, which breaks transformers' PreTrainedModel import, and no
# bergson module imports torchvision, torchaudio or bitsandbytes, so all three are left out.
# auto-circuit 1.0.1 imports transformer_lens.past_key_value_caching, which TransformerLens 3 removed, so its venv
# pins TransformerLens 2.18.0 (the last 2.x; and pyarrow 21, the newest that loads with its numpy 1.26). auto-circuit
# itself goes in without its declared dependencies, with the ones the modules it imports need instead: tracr-pypi
# (jax, dm-haiku, chex), word2word, kaleido and the vscode-tqdm fork serve only its tracr models, translation
# tasks, image export and notebook progress bars, and would add several hundred MB (the import check below fails
# if a module it loads is missing).
# sae-dashboard 0.8.0 (benchmarks only, so not part of `all`) declares transformer-lens <3 and transformers <4.57,
# while TransformerLens 2.18.0 wants transformers >=4.57: so TransformerLens 2.17.0 (transformers >=4.51) with
# transformers 4.56.2 (the newest below 4.57), and sae-lens 6.54.12 (the saelens peer's; it allows TransformerLens
# >=2.16.1,<4 and transformers >=4.38.1). sae-dashboard goes in --no-deps: its decode-clt dependency (torchvision,
# torchaudio, nnsight) serves only the Neuronpedia runner's CLT wrapper and hf-transfer only hub downloads; the
# rest of its declared dependencies are pinned below to versions within its ranges (numpy <2 from TransformerLens
# 2.x, so pyarrow 21, as for auto-circuit: datasets imports it and pyarrow 22 needs numpy 2). About 8 minutes on
# a loaded machine, 1.9 GB.
# devinterp 2.0.1 (the version benchmarks/results/llc.json compares against) with its declared dependencies
# (datasets, xarray, zarr, ...) and, beside it, what interplab's model loading imports (benchmarks/_devinterp_llc.py
# runs with the checkout on PYTHONPATH): einops, jaxtyping, safetensors, tokenizers, pyyaml, pinned to the test
# environment's versions.
# sae-bench 0.6.0 goes in --no-deps with the dependencies its
# core eval and sparse probing import: its declared torchvision pulls a build that does not match the CPU torch
# (transformers then fails to import), and sae-probes brings xgboost, whose nvidia-nccl-cu12 would be the venv's
# CUDA package; openai, plotly, seaborn and matplotlib serve its autointerp and plots. numpy <2 and datasets <4
# are its own pins; pyarrow 25.0.1 is the newest that loads with numpy 1.26.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want=${1:-all}
case "$want" in all | tl | saelens | autocircuit | circuittracer | kronfluence | devinterp | saebench | saedashboard | dattri | logix | bergson) ;; *) echo "usage: bash scripts/peers.sh [all|tl|saelens|autocircuit|circuittracer|kronfluence|devinterp|saebench|saedashboard|dattri|logix|bergson], got '$want'" >&2; exit 2 ;; esac
TORCH=2.13.0
build() {  # name, distribution, version, import name[, dependencies: then the distribution goes in --no-deps
  # (an empty one: with its own)[, packages installed beside it]
  local dir=".peers/$1" dist=$2 version=$3 mod=$4 deps=${5:-} beside=${6:-}
  local check="import importlib.metadata as m, sys, torch, $mod
cuda = [d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia')]
sys.exit(m.version('$dist') != '$version' or torch.version.cuda is not None or bool(cuda))"
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "$check" 2>/dev/null; then return; fi
  local start=$SECONDS
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q "torch==$TORCH"
  if [ -z "$deps" ]; then
    # shellcheck disable=SC2086  # the list of packages beside it is meant to split into words
    "$dir/bin/pip" install -q "torch==$TORCH" "$dist==$version" $beside
  else
    # shellcheck disable=SC2086  # the dependency list is meant to split into words
    "$dir/bin/pip" install -q "torch==$TORCH" $deps
    "$dir/bin/pip" install -q --no-deps "$dist==$version"
  fi
  if ! "$dir/bin/python" -c "$check"; then
    echo "peers.sh: $dir does not import $mod $version with a CPU torch ($("$dir/bin/python" -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
  fi
  echo "peers.sh: built $dir ($dist $version) in $((SECONDS - start)) s" >&2
}
# `all` builds the peers side by side (pip's downloads and unpacking overlap; each build's output goes to
# .peers/<name>.log, shown when it fails), a named one in the foreground
pending=()
peer() {  # build's arguments
  if [ "$want" != all ]; then build "$@"; return; fi
  mkdir -p .peers
  build "$@" >".peers/$1.log" 2>&1 &
  pending+=("$1:$!")
}
if [ "$want" = all ] || [ "$want" = tl ]; then peer tl transformer-lens 3.9.0 transformer_lens; fi
if [ "$want" = all ] || [ "$want" = saelens ]; then peer saelens sae-lens 6.54.12 sae_lens; fi
if [ "$want" = all ] || [ "$want" = autocircuit ]; then
  peer autocircuit auto-circuit 1.0.1 auto_circuit.prune \
    "transformer-lens==2.18.0 pyarrow==21.0.0 einops ordered-set plotly blobfile safetensors"
fi
if [ "$want" = all ] || [ "$want" = circuittracer ]; then
  peer circuittracer circuit-tracer 0.5.0 circuit_tracer.replacement_model.replacement_model_transformerlens
fi
if [ "$want" = all ] || [ "$want" = kronfluence ]; then peer kronfluence kronfluence 1.0.1 kronfluence.analyzer; fi
if [ "$want" = all ] || [ "$want" = devinterp ]; then
  peer devinterp devinterp 2.0.1 "devinterp.slt.llc, datasets, einops, jaxtyping, safetensors, tokenizers, yaml" "" \
    "einops==0.8.2 jaxtyping==0.3.11 safetensors==0.8.0 tokenizers==0.23.3 pyyaml==6.0.4"
fi
if [ "$want" = all ] || [ "$want" = saebench ]; then
  peer saebench sae-bench 0.6.0 "sae_bench.evals.core.main, sae_bench.evals.sparse_probing.probe_training" \
    "sae-lens==6.54.12 transformer-lens==3.9.0 numpy==1.26.4 datasets==3.6.0 einops==0.8.2 jaxtyping==0.3.11
     pyarrow==25.0.1 pandas==2.3.3 pydantic==2.14.4 beartype==0.23.1 scikit-learn==1.9.1 tabulate==0.10.0 tqdm==4.70.1"
fi
failed=0
for job in "${pending[@]}"; do
  name=${job%%:*}
  if wait "${job#*:}"; then
    grep -h "^peers.sh: built" ".peers/$name.log" >&2 || true
  else
    echo "peers.sh: building .peers/$name failed; its output (.peers/$name.log), last lines:" >&2
    tail -n 40 ".peers/$name.log" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] || exit 1
if [ "$want" = dattri ]; then build dattri dattri 0.3.0 dattri.algorithm.trak; fi
if [ "$want" = logix ]; then
  PIP_IGNORE_REQUIRES_PYTHON=1 build logix logix-ai 0.1.1 logix \
    "numpy==2.4.6 einops==0.8.2 pyyaml==6.0.4 tqdm==4.70.1 safetensors==0.8.0"
fi
if [ "$want" = bergson ]; then
  build bergson bergson 2.5.1 "bergson, bergson.collector.in_memory_collector" \
    "accelerate==1.16.0 datasets==5.2.0 huggingface_hub==2.4.0 jaxtyping==0.3.11 Jinja2==3.1.6 ml_dtypes==0.7.0
     natsort==8.4.0 numpy==2.4.6 peft==0.21.2 petname==2.9 pyarrow==26.0.1 PyYAML==6.0.4 safetensors==0.8.0
     scipy==1.17.1 simple-parsing==0.1.9 torchopt==0.7.3 transformers==5.25.0"
fi
if [ "$want" = saedashboard ]; then
  build saedashboard sae-dashboard 0.8.0 sae_dashboard.sae_vis_runner \
    "transformer-lens==2.17.0 transformers==4.56.2 sae-lens==6.54.12 numpy==1.26.4 pyarrow==21.0.0 datasets==3.6.0
     safetensors==0.4.5 dataclasses-json==0.6.7 eindex-callum==0.1.2 einops==0.8.2 jaxtyping==0.2.38
     matplotlib==3.11.2 rich==13.9.4 typer==0.12.5"
fi
# the interpreters that are there (built now or before), each with what reads it
say() { if [ -x "$PWD/.peers/$2/bin/python" ]; then echo "$1$PWD/.peers/$2/bin/python"; fi; }
say INTERPLAB_TL_PYTHON= tl
say INTERPLAB_SAELENS_PYTHON= saelens
say INTERPLAB_AUTOCIRCUIT_PYTHON= autocircuit
say INTERPLAB_CIRCUITTRACER_PYTHON= circuittracer
say INTERPLAB_KRONFLUENCE_PYTHON= kronfluence
say INTERPLAB_DEVINTERP_PYTHON= devinterp
say INTERPLAB_SAEBENCH_PYTHON= saebench
say "SAEDashboard (benchmarks/bench_features.py --sd-python): " saedashboard
say "dattri (benchmarks/bench_attribution.py --dattri-python): " dattri
say "LogIX (tests/logix_peer.py, INTERPLAB_LOGIX_PYTHON): " logix
say "bergson (tests/bergson_peer.py, INTERPLAB_BERGSON_PYTHON): " bergson
