"""A lone query's latency against the raw forward of the same weights, idle and beside busy
processes, under the daemon's OpenMP wait policy and under a short spin: one run.

    .venv/bin/python -m bench.lone --checkpoint DIR [--quantize w8a8] [--queries 9] [--busy 2]

Rows: the raw transformers forward of the one text (the daemon's loader, then `model.model(...)`,
in a process of its own under the same OpenMP settings), then a daemon (embedding model only) asked
for the same text (distinct instructions: never from the cache), one request at a time; each idle
and beside `--busy` busy processes (plain Python loops, as bench.contention). Prints p50 and max in
ms, and each row over the raw forward measured in the same state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.contention import _environ, busy
from bench.harness import ROOT, Servers
from bench.w8a8 import QUERY
from qwen3vl_client.client import Client

# The OpenMP settings compared: the daemon's default, and a ~0.1 ms spin (libgomp: ~100,000 spins a ms).
POLICIES = {"PASSIVE (daemon default)": {}, "PASSIVE + GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}}
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def raw_phase(args) -> None:
    """In its own process: the raw forward's one-text times, idle then busy, as JSON."""
    from bench.w8a8 import forward
    from daemon.config import MediaPolicy, ModelSettings
    from daemon.inputs.media_reader import MediaReader
    from qwen3vl_client.inputs import InputItem
    from daemon.models import EmbeddingModel

    model = EmbeddingModel(ModelSettings(args.checkpoint, dtype=args.dtype, quantize=args.quantize),
                           MediaReader(MediaPolicy()))
    ids = [model.prepare(InputItem("inputs[0]", texts=(QUERY,))).input_ids]
    forward(model, ids)
    found = {"idle": [forward(model, ids) for _ in range(args.queries)]}
    with busy(args.busy, args.queries * 10.0):
        found["busy"] = [forward(model, ids) for _ in range(args.queries)]
    print(json.dumps(found))


def daemon_times(endpoint: str, args) -> dict:
    found = {}
    with Client(endpoint, timeout=600) as c:
        c.embed([QUERY], instruction="warm")
        for state, hogs in (("idle", 0), ("busy", args.busy)):
            times = []
            with busy(hogs, args.queries * 10.0):
                for i in range(args.queries):
                    start = time.perf_counter()
                    c.embed([QUERY], instruction=f"{state} {i}")
                    times.append(time.perf_counter() - start)
            found[state] = times
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--quantize", default="w8a8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--queries", type=int, default=9)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:
        raw_phase(args)
        return
    base = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        for k, (name, extra) in enumerate(POLICIES.items()):
            env = {**base, "OMP_WAIT_POLICY": "PASSIVE", **extra}
            out = subprocess.run([sys.executable, "-m", "bench.lone", "--raw", "--checkpoint", args.checkpoint,
                                  "--quantize", args.quantize, "--dtype", args.dtype, "--queries", str(args.queries),
                                  "--busy", str(args.busy)], cwd=ROOT, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows[f"raw forward, {name}"] = json.loads(out.stdout.strip().splitlines()[-1])
            with _environ({**base, **extra}):  # the daemon sets PASSIVE itself
                endpoint = servers.daemon(Path(tmp), f"d{k}", Path(args.checkpoint), "--reranker-model", "none",
                                          "--dtype", args.dtype, "--quantize", args.quantize)
            rows[f"daemon, {name}"] = daemon_times(endpoint, args)
            servers.close()
    report(args, rows)


def report(args, rows: dict) -> None:
    print(f"{args.checkpoint}, --quantize {args.quantize}, --dtype {args.dtype}: one text, {args.queries} "
          f"queries a row, idle and beside {args.busy} busy processes; ms")
    print(f"{'':52} {'idle p50':>9} {'max':>7} {'/raw':>5} {'busy p50':>9} {'max':>7} {'/raw':>5}")
    for name, found in rows.items():
        policy = name.split(", ", 1)[1]
        raw = rows[f"raw forward, {policy}"]
        cells = []
        for state in ("idle", "busy"):
            p50 = statistics.median(found[state])
            cells.append(f"{p50 * 1e3:9.0f} {max(found[state]) * 1e3:7.0f} {p50 / statistics.median(raw[state]):5.2f}")
        print(f"{name:52} {' '.join(cells)}")


if __name__ == "__main__":
    main()
