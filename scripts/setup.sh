#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything the daemon,
# the bridge and the tests need, at the versions pinned in constraints.txt. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v ffmpeg >/dev/null 2>&1; then
  # torchcodec decodes video files through FFmpeg's libraries.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ffmpeg (Debian package)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "setup: ffmpeg is missing; install it (e.g. 'sudo apt-get install ffmpeg') for video files" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, pinned: this build runs on CUDA and on the CPU.
"${PIP[@]}" install -c constraints.txt "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
"${PIP[@]}" install -c constraints.txt -e ".[bridge,test]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import daemon, torch, transformers, zmq, qwen_vl_utils, torchcodec" \
  || { echo "setup: the environment is incomplete" >&2; exit 1; }
echo "setup: ready ($VENV)" >&2
