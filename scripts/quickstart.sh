#!/usr/bin/env bash
# Set up, build a tiny random-weight checkpoint locally (no download), start the daemon on it,
# embed and rerank a sample through the socket, print the results, and stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN=.venv/bin/qwen3vl-daemon
WORK=$(mktemp -d)
export QWEN3VL_ENDPOINT="ipc://$WORK/sock/daemon.sock"
"$BIN" tiny-checkpoint "$WORK/tiny" >/dev/null
"$BIN" serve --embedding-model "$WORK/tiny" --reranker-model "$WORK/tiny" --log-level warning &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 120); do
  "$BIN" health --timeout 1 2>/dev/null | grep -q '"status": "ready"' && break
  sleep 0.5
done
echo "== health";  "$BIN" health
echo "== embed (dimension 8)"; "$BIN" embed "A cat sits on the mat." "Stocks fell sharply." --dimension 8
echo "== rerank";  "$BIN" rerank "Where is the cat?" "A cat sits on the mat." "Stocks fell sharply."
echo "(random weights: the numbers show the path works, not model quality)"
echo "(to go on: '. .venv/bin/activate', then the commands under 'Using it' in README.md)"
