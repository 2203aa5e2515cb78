#!/usr/bin/env bash
# Create .venv and install moe_train with its dev tools. Idempotent: re-installs only when setup.py or
# csrc/ changed. torch is installed first and pinned, so pip never pulls a multi-GB CUDA build here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
stamp=.venv/.moe_train-installed
want=$(cat setup.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  .venv/bin/pip install -q "setuptools>=77" wheel   # the build runs without isolation (it needs torch)
  .venv/bin/pip install -q --no-build-isolation -e ".[dev]"
  echo "$want" > "$stamp"
fi
