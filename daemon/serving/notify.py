"""systemd's notification protocol (sd_notify), without a library: datagrams to $NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same everywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None):
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # An address starting with '@' is in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = None
        if self.address:
            # Non-blocking: a full receive queue drops a message instead of stalling the socket loop.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.watchdog_usec = self._watchdog_usec(env)
        self._lock = threading.Lock()

    @staticmethod
    def _watchdog_usec(env) -> int | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of WatchdogSec, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, *lines: str, retry_s: float = 1.0) -> None:
        """Send one notification. A full queue is retried for up to `retry_s` (0 for watchdog pings,
        which the next ping replaces); nothing here ever raises or blocks for long."""
        if self._sock is None:
            return
        data, end = "\n".join(lines).encode(), time.monotonic() + retry_s
        while True:
            try:
                with self._lock:
                    self._sock.sendto(data, self.address)
                return
            except BlockingIOError:
                if time.monotonic() >= end:
                    log.debug("sd_notify queue full; dropped %s", lines[0])
                    return
                time.sleep(0.01)
            except OSError as exc:  # systemd gone: never fatal
                log.debug("sd_notify failed: %s", exc)
                return

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def ready(self, text: str = "ready") -> None:
        self.send("READY=1", f"STATUS={text}")

    def stopping(self, text: str = "draining") -> None:
        self.send("STOPPING=1", f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1", retry_s=0.0)

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class LoadProgress:
    """While models load, report progress in STATUS and, while a download is still moving (the
    Hugging Face cache keeps growing), extend systemd's start timeout. A stalled download stops
    extending it, so systemd gives up and restarts the service instead of waiting forever."""

    def __init__(self, notifier: Notifier, cache_dir: Path, describe, interval_s: float = 5.0):
        self.notifier = notifier
        self.cache_dir = cache_dir
        self.describe = describe  # () -> str: what is loading now
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwen3vl-load-progress", daemon=True)

    def start(self) -> "LoadProgress":
        if self.notifier.enabled:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        start, last = time.monotonic(), _tree_bytes(self.cache_dir)
        while not self._stop.wait(self.interval_s):
            now = _tree_bytes(self.cache_dir)
            moving = now > last
            fetched = f", {now / 1e9:.2f} GB in the model cache" if now else ""
            self.notifier.status(f"{self.describe()} ({time.monotonic() - start:.0f} s{fetched})")
            if moving:
                self.notifier.extend_timeout(self.interval_s * 3)
            last = now
