#!/usr/bin/env bash
# What installs without the daemon (CI runs this before the main suite), each in a clean venv:
#  1. the Python client, `pip install ./clients/python` (timed), and its tests against the installed
#     package (pytest's script, not `python -m`, so the source folder cannot stand in for it),
#     without numpy and then with it, against a daemon running from .venv;
#  2. the slim bridge image's dependency set, installed as bridge.Containerfile installs it
#     (--no-deps, then pip check), and the bridge served from it (deploy/container/tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# pip, quiet, without its index warnings; a failed install still fails the script (pipefail).
pip_quiet() { "$@" -q --disable-pip-version-check 2>&1 | { grep -v "is ignored" || true; }; }
no_heavy() {  # no torch, transformers, numpy or daemon package in the venv at $1 (away from the checkout)
  ( cd "$WORK" && "$1/bin/python" -c "import importlib.util as u, sys
found = [m for m in ('torch', 'transformers', 'numpy', 'daemon') if u.find_spec(m)]
sys.exit(f'test-slim: {found} installed in $1' if found else 0)" )
}
.venv/bin/qwen3vl-daemon tiny-checkpoint "$WORK/tiny" >/dev/null 2>&1
export QWEN3VL_TEST_DAEMON_PYTHON="$PWD/.venv/bin/python" QWEN3VL_TEST_CHECKPOINT="$WORK/tiny"

"$PYTHON" -m venv "$WORK/client"
start=$(date +%s%N)
pip_quiet "$WORK/client/bin/pip" install ./clients/python
echo "test-slim: pip install ./clients/python: $(( ($(date +%s%N) - start) / 1000000 )) ms" >&2
( cd "$WORK" && "$WORK/client/bin/python" -c "import qwen3vl_client.client, qwen3vl_client.protocol" )
no_heavy "$WORK/client"
pip_quiet "$WORK/client/bin/pip" install -c constraints.txt pytest
echo "test-slim: the client's tests without numpy" >&2
( cd clients/python && "$WORK/client/bin/pytest" -q -p no:cacheprovider tests )
pip_quiet "$WORK/client/bin/pip" install -c constraints.txt numpy
"$WORK/client/bin/python" -c "import numpy"
echo "test-slim: the client's tests with numpy" >&2
( cd clients/python && "$WORK/client/bin/pytest" -q -p no:cacheprovider tests )

"$PYTHON" -m venv "$WORK/bridge"
pip_quiet "$WORK/bridge/bin/pip" install --no-deps --no-compile -r deploy/container/bridge.requirements.txt
"$WORK/bridge/bin/pip" check
no_heavy "$WORK/bridge"
pip_quiet "$WORK/bridge/bin/pip" install -c constraints.txt pytest
echo "test-slim: the bridge from its slim dependency set" >&2
"$WORK/bridge/bin/pytest" -q -p no:cacheprovider deploy/container/tests
