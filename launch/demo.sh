#!/usr/bin/env bash
# The tiny CPU pretraining demo: set up, build the built-in multi-domain corpus (cached), train.
# Extra arguments are passed to `moe-train train` as dotted overrides, e.g. train.max_steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
grep -qs '"moe_train.data/2"' data_cache/demo/manifest.json || .venv/bin/moe-train data build --out data_cache/demo --force
exec .venv/bin/moe-train train --config configs/tiny_cpu.yaml "$@"
