#!/usr/bin/env bash
# Install qwen3vl-daemon as systemd services (run as root from a checkout):
#   - user and group `qwen3vl` (add the Rust server's user to the group to reach the socket)
#   - the code and its virtual environment in /opt/qwen3vl-daemon
#   - settings in /etc/qwen3vl-daemon/{daemon,bridge}.env (kept if present)
#   - units in /etc/systemd/system, enabled and started: the daemon, and the bridge with --bridge
# Options: --bridge (also enable the HTTP bridge), --gpus N (one daemon per GPU: qwen3vl-daemon@0..N-1),
#          --no-start (install only).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install: run as root" >&2; exit 1; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/qwen3vl-daemon ETC=/etc/qwen3vl-daemon UNITS=/etc/systemd/system
BRIDGE=0 GPUS=0 START=1
while [ $# -gt 0 ]; do
  case "$1" in
    --bridge) BRIDGE=1 ;;
    --gpus) GPUS=$2; shift ;;
    --no-start) START=0 ;;
    *) echo "install: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

getent group qwen3vl >/dev/null || groupadd --system qwen3vl
getent passwd qwen3vl >/dev/null || useradd --system --gid qwen3vl --home-dir /var/cache/qwen3vl \
  --shell /usr/sbin/nologin --comment "Qwen3-VL daemon" qwen3vl

install -d -m 0755 "$PREFIX"
tar -C "$SRC" --exclude=.git --exclude=.venv --exclude='__pycache__' -cf - . | tar -C "$PREFIX" -xf -
VENV="$PREFIX/venv" bash "$PREFIX/scripts/setup.sh"

install -d -m 0750 -g qwen3vl "$ETC"
for f in daemon.env bridge.env; do
  [ -e "$ETC/$f" ] || install -m 0640 -g qwen3vl "$SRC/systemd/env/$f" "$ETC/$f"
done
install -m 0644 "$SRC"/systemd/*.service "$UNITS/"
systemctl daemon-reload

units=()
if [ "$GPUS" -gt 0 ]; then
  for i in $(seq 0 $((GPUS - 1))); do units+=("qwen3vl-daemon@$i.service"); done
else
  units+=(qwen3vl-daemon.service)
fi
[ "$BRIDGE" = 1 ] && units+=(qwen3vl-bridge.service)
if [ "$START" = 1 ]; then systemctl enable --now "${units[@]}"; else systemctl enable "${units[@]}"; fi
echo "installed: ${units[*]}; settings in $ETC; add client users to group qwen3vl" >&2
