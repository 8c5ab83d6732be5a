"""Per-request latency over IPC: `health` and a one-text `embed` against a daemon on the tiny model.

    .venv/bin/python -m bench.roundtrip [--requests 500]

Starts its own daemon on a fresh tiny checkpoint, measures sequential round trips with the bundled
blocking client, prints p50/p90/p99 in milliseconds. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import Servers

from qwen3vl_client.client import Client
from daemon.loading.tiny import build_tiny_checkpoint


def measure(call, n: int) -> np.ndarray:
    for _ in range(min(50, n)):
        call()
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return times * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Servers() as servers:
            endpoint = servers.daemon(work, "daemon", build_tiny_checkpoint(work / "tiny"))
            with Client(endpoint) as c:
                rows = {
                    "health": measure(lambda: c.health(), args.requests),
                    "embed, one text": measure(lambda: c.embed(["the quick brown fox"]), args.requests),
                }
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}; "
          f"{args.requests} sequential requests each, tiny model, IPC")
    print(f"{'request':<18}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for name, t in rows.items():
        print(f"{name:<18}{np.percentile(t, 50):9.3f}{np.percentile(t, 90):9.3f}{np.percentile(t, 99):9.3f}")


if __name__ == "__main__":
    main()
