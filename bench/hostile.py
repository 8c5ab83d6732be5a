"""What one client's heavy traffic costs everyone else, measured on the tiny checkpoint:

    .venv/bin/python -m bench.hostile

1. socket loop: `health` round trips while three huge inline-sized requests run (an embed of 4 texts
   of 1M characters, two reranks of a 1M-character query with 4 documents of 1M), against idle;
   and the longest gap between watchdog pings (WatchdogSec=2 s, pings due every 1 s);
2. fairness: one-text embeds from a second client in a closed loop while one client's 1024-input
   ingest runs, against the same embeds on an idle daemon, and against the ingest's own duration.
Absolute times drift on a shared machine; the ratios are what count.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from bench.harness import Servers
from bench.probes import NotifySocket, health_latencies

from qwen3vl_client.client import Client
from daemon.loading.tiny import build_tiny_checkpoint

HUGE = "lorem ipsum dolor sit amet " * 37_000  # ~1M characters


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000.0


def max_gap(pings: NotifySocket, start: float, end: float) -> float:
    seen = [t for t in pings.times("WATCHDOG") if start <= t <= end]
    return max((b - a for a, b in zip(seen, seen[1:])), default=float("nan"))


def socket_loop(servers: Servers, work: Path, ckpt: Path, seconds: float, runs: int = 1) -> list[tuple[str, str]]:
    pings = NotifySocket(work)
    import os
    os.environ.update(NOTIFY_SOCKET=str(pings.path), WATCHDOG_USEC="2000000")
    try:
        endpoint = servers.daemon(work, "stall", ckpt)
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    idle = health_latencies(endpoint, 2.0)
    rows = [("health idle: p50 / p99 / max", f"{pct(idle, 50):.2f} / {pct(idle, 99):.2f} / {max(idle) * 1000:.2f} ms "
                                             f"({len(idle)} calls)")]
    for run in range(1, runs + 1):
        rows += _huge_requests(endpoint, pings, seconds, f" (run {run})" if runs > 1 else "")
    pings.close()
    return rows


def _huge_requests(endpoint: str, pings: NotifySocket, seconds: float, label: str) -> list[tuple[str, str]]:
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
    assert all(r["ok"] for r in replies), replies
    return [
        (f"health while 3 huge requests run{label}: p50 / p99 / max",
         f"{pct(busy, 50):.2f} / {pct(busy, 99):.2f} / {max(busy) * 1000:.2f} ms ({len(busy)} calls)"),
        (f"the 3 huge requests took{label}", f"{finished - started:.1f} s"),
        (f"longest watchdog gap meanwhile{label} (due every 1 s, fatal at 2 s)",
         f"{max_gap(pings, started, finished):.2f} s"),
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
    with Client(endpoint, timeout=600) as c:
        start = time.monotonic()
        c.embed(ingest)
        alone = time.monotonic() - start
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
        while not done.is_set():  # every call started while the ingest runs counts, however long it takes
            start = time.perf_counter()
            c.embed([f"query during {i}"])
            during.append(time.perf_counter() - start)
            i += 1
    thread.join()
    return [
        ("one-text embed, idle daemon: p50 / p99", f"{pct(idle, 50):.1f} / {pct(idle, 99):.1f} ms"),
        ("one-text embed during a 1024-input ingest: p50 / p99 / max",
         f"{pct(during, 50):.1f} / {pct(during, 99):.1f} / {max(during) * 1000:.1f} ms ({len(during)} calls)"),
        ("the ingest alone took / with the one-text client beside it", f"{alone:.1f} s / {ingest_time[0]:.1f} s"),
        ("p99 during the ingest / the ingest's duration", f"{pct(during, 99) / 1000 / ingest_time[0]:.3f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="health sampling while the huge requests run")
    parser.add_argument("--runs", type=int, default=1, help="rounds of the huge requests on the same daemon")
    parser.add_argument("--socket-only", action="store_true", help="skip the fairness part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        ckpt = build_tiny_checkpoint(work / "tiny")
        rows = socket_loop(servers, work, ckpt, args.seconds, args.runs)
        if not args.socket_only:
            rows += fairness(servers, work, ckpt)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
