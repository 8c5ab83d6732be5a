#!/usr/bin/env bash
# The same benchmark on a CUDA machine, with a random-weight model of the real Qwen3-VL-2B shape as
# the compute-bound model (no weights are needed for timing). Prints the table and writes it to
# $OUT/benchmarks-gpu.md (or ./benchmarks-gpu.md). Needs the project's environment (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
.venv/bin/python -m bench.run --device cuda --big 2b --requests 500 --load-seconds 15 \
  --out "${OUT:-.}/benchmarks-gpu.md"
