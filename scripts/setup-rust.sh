#!/usr/bin/env bash
# What the Rust client (clients/rust) builds against, offline: Debian's packaged crates and libzmq.
set -euo pipefail
PKGS="libzmq3-dev pkg-config librust-zmq-dev librust-rmp-serde-dev librust-serde-dev librust-serde-derive-dev
      librust-serde-bytes-dev librust-thiserror-dev librust-anyhow-dev librust-serde-json-dev"
missing=$(for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
command -v cargo >/dev/null 2>&1 || missing="$missing cargo"
if [ -n "$(echo $missing)" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-rust: installing $(echo $missing)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup-rust: missing Debian packages: $(echo $missing) (sudo apt-get install ...)" >&2
    exit 1
  fi
fi
