#!/usr/bin/env bash
# Set up the environment and run every test suite (what CI runs): the Python client and the slim
# bridge each in a clean venv without torch, the Rust client's tests against live daemons, then the
# Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-rust.sh
bash scripts/test-slim.sh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/qwen3vl-daemon tiny-checkpoint "$WORK/tiny" >/dev/null 2>&1
# QWEN3VL_DTYPE: the daemons under test compute in float32 whatever the CPU (as tests/conftest.py sets).
( cd clients/rust && QWEN3VL_DTYPE=float32 QWEN3VL_TEST_PYTHON="$PWD/../../.venv/bin/python" QWEN3VL_TEST_CHECKPOINT="$WORK/tiny" \
    cargo test --lib --tests )
.venv/bin/python -m pytest -q "$@"
