"""Latency of the Rust server's hot path (1-text and 2-text calls through the bridge's `/embed`, and
the socket), idle and beside other busy processes, under libgomp's default wait policy (~3 ms of
spinning), a short spin (the daemon's PASSIVE with GOMP_SPINCOUNT=10000, ~0.1 ms) and the daemon's
default (OMP_WAIT_POLICY=PASSIVE: no spin); and what each costs a large batch on an idle machine.

    .venv/bin/python -m bench.contention [--spec bench|tiny] [--calls 60] [--busy 2] [--quantize w8a8]

Starts, per policy, one daemon (both models) and a bridge in front of it. `busy` processes are
plain Python loops (bounded: each stops by itself after `--busy-seconds`), standing in for whatever
else keeps the cores busy on a user's machine (the memory server, a local LLM). Each call's texts
differ in length, as a store's do. Prints p50/p99/max in milliseconds, and the ratio of the two
policies measured in this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.harness import Servers
from qwen3vl_client.client import Client
from daemon.loading.tiny import BENCH_SPEC, build_tiny_checkpoint

# Each policy: the OpenMP variables the daemon starts with (None: left to the daemon's own defaults;
# "" reads as unset to libgomp).
POLICIES = {"libgomp default": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": None},
            "PASSIVE + GOMP_SPINCOUNT=10000 (a short spin)": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"},
            "daemon default (PASSIVE)": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}}
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
HOG = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy(processes: int, seconds: float):
    hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=seconds)]) for _ in range(processes)]
    try:
        time.sleep(0.2)
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def texts(i: int, n: int) -> list[str]:
    return [f"memory {i}.{k}: " + "the quick brown fox jumps " * (1 + (i * 7 + k) % 9) for k in range(n)]


def timed(call, calls: int) -> np.ndarray:
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1000.0


def row(label: str, ms: np.ndarray) -> str:
    return f"{label:<44} p50 {np.median(ms):7.1f}  p99 {np.percentile(ms, 99):7.1f}  max {ms.max():7.1f}"


def measure(endpoint: str, url: str, args) -> dict[str, np.ndarray]:
    found = {}
    with Client(endpoint, timeout=120) as c, httpx.Client(base_url=url, timeout=120) as http:
        for i in range(5):  # warm: first calls, the connection
            http.post("/embed", json={"texts": texts(i, 2)}).raise_for_status()
        found["idle, 32 texts (socket)"] = timed(lambda i: c.embed(texts(i, 32)), max(5, args.calls // 6))
        for load in ("idle", f"{args.busy} busy"):
            with busy(args.busy if load != "idle" else 0, args.busy_seconds):
                for n in (1, 2):
                    found[f"{load}, {n} text(s), bridge /embed"] = timed(
                        lambda i: http.post("/embed", json={"texts": texts(i, n)}).raise_for_status(), args.calls)
                found[f"{load}, 1 text, socket"] = timed(lambda i: c.embed(texts(i, 1)), args.calls)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes beside the daemon")
    parser.add_argument("--busy-seconds", type=float, default=120.0)
    parser.add_argument("--quantize", default="none", help="the daemons' --quantize (w8a8: the int8 forward)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        ckpt = build_tiny_checkpoint(work / "ckpt", **({"spec": BENCH_SPEC} if args.spec == "bench" else {}))
        results = {}
        for name, values in POLICIES.items():
            env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
            env.update({k: v for k, v in values.items() if v is not None})
            with _environ(env):
                endpoint = servers.daemon(work, f"d{len(results)}", ckpt, "--quantize", args.quantize)
                url = servers.bridge(work, f"b{len(results)}", endpoint)
            results[name] = measure(endpoint, url, args)
            servers.close()
        print(f"{args.spec} checkpoint, --quantize {args.quantize}, {os.cpu_count()} cores, {args.calls} calls per "
              "row, times in ms")
        for name, found in results.items():
            print(f"-- OMP wait policy: {name}")
            for label, ms in found.items():
                print(row(label, ms))
        *others, daemon = results.items()
        for name, found in others:
            print(f"-- p99 ratio {name} / the daemon's default (>1: the daemon's default is faster)")
            for label in found:
                print(f"{label:<44} {np.percentile(found[label], 99) / np.percentile(daemon[1][label], 99):6.2f}")


@contextlib.contextmanager
def _environ(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


if __name__ == "__main__":
    main()
