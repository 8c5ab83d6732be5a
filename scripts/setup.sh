#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything the daemon,
# the bridge and the tests need, at the versions pinned in constraints.txt. Idempotent.
# One line per step; on a terminal pip shows its own progress, elsewhere (CI, logs) it is quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
step() { echo "setup: [$1/4] $2" >&2; }

step 1 "ffmpeg (video decoding)"
if ! command -v ffmpeg >/dev/null 2>&1; then
  # torchcodec decodes video files through FFmpeg's libraries.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ffmpeg (Debian package)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "setup: ffmpeg is missing; install it (e.g. 'sudo apt-get install ffmpeg') for video files" >&2
  fi
fi

step 2 "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() {
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check install -c constraints.txt)
  if [ -t 2 ]; then
    "${pip[@]}" "$@"  # on a terminal: pip's own progress bars
  else
    # logs: quiet, without pip's index warnings; a failed install still fails the step (pipefail)
    "${pip[@]}" -q "$@" 2>&1 | { grep -v "is ignored" || true; }
  fi
}
# torch first, pinned: this build runs on CUDA and on the CPU.
step 3 "torch 2.14.1 and torchvision 0.29.1 (the largest download: a few minutes on a first run)"
pip_install "torch==2.14.1" "torchvision==0.29.1"
# QWEN3VL_EXTRAS: the optional parts (the container image leaves out the test tools).
EXTRAS=${QWEN3VL_EXTRAS:-bridge,quant,dataset,ray,test}
step 4 "the client (clients/python), the daemon and its extras [$EXTRAS] (pinned in constraints.txt)"
# In one pip command: the daemon depends on qwen3vl-client, which this checkout carries.
pip_install -e ./clients/python -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import daemon, qwen3vl_client, torch, transformers, zmq, qwen_vl_utils, torchcodec, torchao" \
  || { echo "setup: the environment is incomplete" >&2; exit 1; }
echo "setup: ready ($VENV; run '. $VENV/bin/activate' to put qwen3vl-daemon on the PATH)" >&2
