#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (bench/gpu.py), on a bare lent GPU machine or any CUDA machine.
#
#   bench/gpu.sh             on the GPU: the real Qwen3-VL-2B shape in bf16 (random weights)
#   bench/gpu.sh --dry-run   the same steps on the CPU with a small model (scripts/gpu-dryrun.sh)
#
# It installs nothing from the network. Python: $PYTHON, else .venv/bin/python where the project's
# environment exists, else the machine's python3. Packages that Python lacks come from the wheels
# in $WHEELS (default .whl/, made here by scripts/gpu-wheels.sh and carried along), installed
# offline into a temporary folder; the project itself runs from this checkout. Writes the table to
# $OUT/benchmarks-gpu.md (or ./benchmarks-gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/qwen3vl-site.XXXXXX")
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The daemon and its client package (clients/python) run from this checkout.
export PYTHONPATH="$PWD:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PYTHON" -c "
import importlib.metadata as m, sys
import torch, transformers, zmq, msgpack, qwen_vl_utils, qwen3vl_client, daemon.serving.server
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| pyzmq', zmq.__version__, '| qwen-vl-utils', m.version('qwen-vl-utils'), '| cuda', torch.cuda.is_available())"
if [ "$DRY_RUN" = 1 ]; then
  args=(--device cpu --spec bench --seconds 6 --warmup 5 --requests 30)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  args=(--device cuda --spec 2b)
fi
exec timeout 560 "$PYTHON" -m bench.gpu "${args[@]}" --out "${OUT:-.}/benchmarks-gpu.md"
