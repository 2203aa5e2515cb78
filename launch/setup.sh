#!/usr/bin/env bash
# Create .venv and install moe_train with its dev tools. Idempotent: re-installs only when setup.py or
# csrc/ changed. torch is installed first and pinned, so pip never pulls a multi-GB CUDA build here.
# One line per phase that does work (times measured on a 2-core machine with the wheels at hand).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH_VERSION:-2.13.0}
say() { echo "[setup] $*"; }
if [[ ! -x .venv/bin/python ]]; then
  say "creating the environment .venv with $PY (about 5 s)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing torch==$TORCH (about 1 minute)"
  .venv/bin/pip install -q "torch==$TORCH"
fi
stamp=.venv/.moe_train-installed
want=$(cat setup.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  say "installing moe_train with its dev tools and building the C++ extension (about 1.5 minutes)"
  .venv/bin/pip install -q "setuptools>=77" wheel   # the build runs without isolation (it needs torch)
  .venv/bin/pip install -q --no-build-isolation -e ".[dev]"
  echo "$want" > "$stamp"
fi
