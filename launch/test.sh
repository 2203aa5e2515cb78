#!/usr/bin/env bash
# Set up and run the whole test suite plus lint and type checks. A run that collects no test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh || exit 1
.venv/bin/ruff check moe_train tests benchmarks setup.py || exit 1
.venv/bin/ruff format --check moe_train tests benchmarks setup.py || exit 1
.venv/bin/mypy moe_train || exit 1
MOE_TRAIN_REQUIRE_EXT=1 .venv/bin/python -m pytest -q -rs tests "$@"
rc=$?
if [[ $rc -eq 5 ]]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
