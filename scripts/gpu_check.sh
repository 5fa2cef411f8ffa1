#!/usr/bin/env bash
# The checks that need a GPU: the 0.5b benchmark against TRL (with SFT model FLOPs utilisation) and its variants,
# a bf16-true FSDP2 PPO run, flash-attention against sdpa, and the one-GPU pipeline config shortened to a few steps
# on random weights of its shape. Results: one Markdown file to paste into docs/BENCHMARKS.md. On the lent device
# (10 minutes a call) it is two calls: --sections bench,pipeline, then variants,ppo,attention (docs/BENCHMARKS.md).
#
#   scripts/gpu_check.sh [--out gpu_check.md] [--sections pipeline,bench,variants,ppo,attention] [--work DIR]
#   scripts/gpu_check.sh --cpu-smoke      # the same script at tiny sizes on a CPU (CI runs it; about a minute)
#
# On a machine where this project is not installed, wheels of the missing packages in .whl/ (see
# docs/BENCHMARKS.md, "Running the GPU check") are installed to a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import datasets, jsonargparse, torchdata" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cai-site .whl/*.whl
    export PYTHONPATH="/tmp/cai-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: datasets, jsonargparse or torchdata missing and no wheels in .whl/" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
