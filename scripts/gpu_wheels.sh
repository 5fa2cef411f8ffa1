#!/usr/bin/env bash
# Download, into .whl/ (ignored by git), the wheels that the GPU machine's image lacks for scripts/gpu_check.sh:
# its python3 (3.12) has torch, lightning, transformers, peft and tensorboard, but not datasets, jsonargparse,
# torchdata or trl. Versions are those of this checkout's .venv. Run once here; the device call carries .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
pins=()
for pkg in datasets jsonargparse trl torchdata dill multiprocess docstring_parser typeshed_client; do
  pins+=("$pkg==$("$PY" -c "from importlib.metadata import version; print(version('$pkg'))")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls .whl
