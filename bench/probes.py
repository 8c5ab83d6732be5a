"""Observers of a running daemon from outside, shared by the tests and the benchmarks: a stand-in for
systemd's notify socket, and `health` round trips."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import msgpack
import zmq


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, read continuously as systemd
    reads it; records (time, fields)."""

    def __init__(self, directory: Path):
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def drain(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()

    def times(self, key: str) -> list[float]:
        return [t for t, fields in self.messages if key in fields]

    def first(self, key: str) -> int:
        return next(i for i, (_, fields) in enumerate(self.messages) if key in fields)


def health_latencies(endpoint: str, seconds: float) -> list[float]:
    """health round trips, one after another, for `seconds`."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 10_000
    sock.connect(endpoint)
    out = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            sock.send_multipart([b"", msgpack.packb({"op": "health"})])
            sock.recv_multipart()
            out.append(time.perf_counter() - start)
            time.sleep(0.005)
    finally:
        sock.close()
    return out
