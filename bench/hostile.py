"""What one client's heavy traffic costs everyone else, measured on the tiny checkpoint:

    .venv/bin/python bench/hostile.py

1. socket loop: `health` round trips while three huge inline-sized requests run (an embed of 4 texts
   of 1M characters, two reranks of a 1M-character query with 4 documents of 1M), against idle;
   and the longest gap between watchdog pings (WatchdogSec=2 s, pings due every 1 s);
2. fairness: one-text embeds from a second client in a closed loop while one client's 1024-input
   ingest runs, against the same embeds on an idle daemon, and against the ingest's own duration.
Absolute times drift on a shared machine; the ratios are what count.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Servers  # noqa: E402

from daemon.client import Client  # noqa: E402
from daemon.tiny import build_tiny_checkpoint  # noqa: E402

HUGE = "lorem ipsum dolor sit amet " * 37_000  # ~1M characters


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000.0


def health_latencies(endpoint: str, seconds: float) -> list[float]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 30_000
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


class Pings:
    """A stand-in NOTIFY_SOCKET that records when WATCHDOG=1 arrives."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                if b"WATCHDOG=1" in self.sock.recv(4096):
                    self.times.append(time.monotonic())
            except socket.timeout:
                continue

    def max_gap(self, start: float, end: float) -> float:
        seen = [t for t in self.times if start <= t <= end]
        return max((b - a for a, b in zip(seen, seen[1:])), default=float("nan"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


def socket_loop(servers: Servers, work: Path, ckpt: Path, seconds: float) -> list[tuple[str, str]]:
    pings = Pings(work / "notify.sock")
    import os
    os.environ.update(NOTIFY_SOCKET=str(work / "notify.sock"), WATCHDOG_USEC="2000000")
    try:
        endpoint = servers.daemon(work, "stall", ckpt)
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    idle = health_latencies(endpoint, 2.0)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 600_000
    sock.connect(endpoint)
    payloads = [{"op": "embed", "inputs": [HUGE] * 4},
                {"op": "rerank", "query": HUGE, "documents": [HUGE] * 4},
                {"op": "rerank", "query": HUGE, "documents": [HUGE] * 4}]
    started = time.monotonic()
    for p in payloads:
        sock.send_multipart([b"", msgpack.packb(p)])
    busy = health_latencies(endpoint, seconds)
    replies = [msgpack.unpackb(sock.recv_multipart()[-1]) for _ in payloads]
    finished = time.monotonic()
    sock.close()
    pings.close()
    assert all(r["ok"] for r in replies), replies
    return [
        ("health idle: p50 / p99 / max", f"{pct(idle, 50):.2f} / {pct(idle, 99):.2f} / {max(idle) * 1000:.2f} ms "
                                         f"({len(idle)} calls)"),
        ("health while 3 huge requests run: p50 / p99 / max",
         f"{pct(busy, 50):.2f} / {pct(busy, 99):.2f} / {max(busy) * 1000:.2f} ms ({len(busy)} calls)"),
        ("the 3 huge requests took", f"{finished - started:.1f} s"),
        ("longest watchdog gap meanwhile (due every 1 s, fatal at 2 s)",
         f"{pings.max_gap(started, finished):.2f} s"),
    ]


def fairness(servers: Servers, work: Path, ckpt: Path) -> list[tuple[str, str]]:
    endpoint = servers.daemon(work, "fair", ckpt, "--reranker-model", "none")
    ingest = ["word " * 300] * 1024
    with Client(endpoint, timeout=600) as c:
        c.embed(["warm"])
        idle = []
        for i in range(100):
            start = time.perf_counter()
            c.embed([f"query {i}"])
            idle.append(time.perf_counter() - start)
    done = threading.Event()
    ingest_time: list[float] = []

    def run_ingest():
        start = time.monotonic()
        with Client(endpoint, timeout=600) as c:
            assert c.embed(ingest).embeddings.shape[0] == len(ingest)
        ingest_time.append(time.monotonic() - start)
        done.set()

    thread = threading.Thread(target=run_ingest)
    thread.start()
    time.sleep(0.3)
    during = []
    with Client(endpoint, timeout=600) as c:
        i = 0
        while not done.is_set():
            start = time.perf_counter()
            c.embed([f"query during {i}"])
            if not done.is_set():
                during.append(time.perf_counter() - start)
            i += 1
    thread.join()
    return [
        ("one-text embed, idle daemon: p50 / p99", f"{pct(idle, 50):.1f} / {pct(idle, 99):.1f} ms"),
        ("one-text embed during a 1024-input ingest: p50 / p99 / max",
         f"{pct(during, 50):.1f} / {pct(during, 99):.1f} / {max(during) * 1000:.1f} ms ({len(during)} calls)"),
        ("the ingest took", f"{ingest_time[0]:.1f} s"),
        ("p99 during the ingest / the ingest's duration", f"{pct(during, 99) / 1000 / ingest_time[0]:.3f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="health sampling while the huge requests run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        ckpt = build_tiny_checkpoint(work / "tiny")
        rows = socket_loop(servers, work, ckpt, args.seconds) + fairness(servers, work, ckpt)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
