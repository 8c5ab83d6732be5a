#!/usr/bin/env bash
# Remove what scripts/install.sh installed. Settings in /etc/qwen3vl-daemon and the model cache in
# /var/cache/qwen3vl are kept unless --purge is given.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "uninstall: run as root" >&2; exit 1; }
PURGE=0; [ "${1:-}" = --purge ] && PURGE=1
mapfile -t units < <(systemctl list-units --all --plain --no-legend 'qwen3vl-*' | awk '{print $1}')
[ ${#units[@]} -gt 0 ] && systemctl disable --now "${units[@]}" || true
rm -f /etc/systemd/system/qwen3vl-daemon.service /etc/systemd/system/qwen3vl-daemon@.service \
      /etc/systemd/system/qwen3vl-bridge.service
systemctl daemon-reload
rm -rf /opt/qwen3vl-daemon
if [ "$PURGE" = 1 ]; then
  rm -rf /etc/qwen3vl-daemon /var/cache/qwen3vl
  getent passwd qwen3vl >/dev/null && userdel qwen3vl
  getent group qwen3vl >/dev/null && groupdel qwen3vl
fi
echo "uninstalled${PURGE:+ (purge=$PURGE)}" >&2
