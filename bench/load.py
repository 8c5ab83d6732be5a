"""Loading at the speed of memory (issue 36): time to READY and the weights stage against
transformers' own load, in one run.

    .venv/bin/python -m bench.load --checkpoint DIR [--dtype bfloat16] [--runs 2] [--device cuda]

On the checkpoint (default: the Qwen3-VL-2B shape in bf16 with Qwen3's tokenizer, built once), both
models on it, page cache warm, each daemon in a fresh interpreter:
- baseline: transformers' own load of both models + one forward each (bench.startup's);
- the memory ceiling: a fresh process touching as many new bytes as the pair's weights (what owning
  them costs on this host before any byte is read);
- restart (the fingerprint cache knows every digest): READY, its split, the weights' read rate
  from the daemon's log, resident memory idle and after a load that runs every weight (a text and
  an image embedded, a text and an image reranked: small, since bf16 matmuls are slow on CPUs
  without native bf16) against the weights + an idle daemon with no model loaded (`--load on-demand`);
- first start (no fingerprint cache): every file hashed as it is read;
- int8 and nf4: a first start (converts, writes the weights cache), then a restart from the cache;
- on demand: the first request's load of the unloaded embedding model, unquantized and int8.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.harness import Servers, gradient_png, rss_kib
from bench.startup import baseline
from qwen3vl_client.client import Client
from daemon.loading.tiny import QWEN3VL_2B_SPEC, build_tiny_checkpoint

READ = re.compile(r"([\d.]+) GB of weights read in ([\d.]+) s")
TOUCH = """
import sys, time, torch
n = int(sys.argv[1]); began = time.monotonic()
held = [torch.empty(n // 8, dtype=torch.uint8).fill_(1) for _ in range(8)]
print(time.monotonic() - began)
"""


def touch_every_weight(client: Client) -> None:
    """The smallest load that runs every weight of both models: a text and a small image through
    the embedding model (language model and vision tower), and a rerank of a text and an image."""
    image = {"image": gradient_png(7, size=(64, 64))}
    client.embed(["a short text", image])
    client.rerank("a short query", ["a short document", image])


def ceiling(nbytes: int) -> float:
    """Seconds a fresh process takes to touch `nbytes` of new memory (one fill per eighth)."""
    out = subprocess.run([sys.executable, "-c", TOUCH, str(nbytes)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


DEVICE = ["--device", "cpu"]  # main() sets it from --device


def serve(servers: Servers, work: Path, name: str, ckpt: Path, cache: Path, *extra: str):
    """(endpoint, process, seconds to READY, log path) of a daemon with both models on `ckpt`."""
    began = time.monotonic()
    endpoint = servers.daemon(work, name, ckpt, "--fingerprint-cache", str(cache), *DEVICE, *extra,
                              log_level="info", timeout_s=900)
    return endpoint, servers.by_name[name], time.monotonic() - began, work / f"{name}.log"


def stop(proc) -> None:
    proc.terminate()
    proc.wait(120)


def read_rate(log: Path) -> tuple[float, float]:
    """(GB, seconds) of the weights' reads the daemon logged."""
    found = [(float(gb), float(s)) for gb, s in READ.findall(log.read_text(errors="replace"))]
    return sum(gb for gb, _ in found), sum(s for _, s in found)


def wait_cache_written(endpoint: str, entries: int) -> dict:
    """health's weights_cache once `entries` entries are written and none is being written."""
    with Client(endpoint, timeout=60) as client:
        for _ in range(3000):
            stats = client.health().get("weights_cache") or {}
            if stats.get("entries", 0) >= entries and not stats.get("writing"):
                return stats
            time.sleep(0.2)
    raise RuntimeError(f"the weights cache did not reach {entries} entries: {stats}")


def restart(servers, work, ckpt, cache, dtype, runs: int) -> dict:
    """Restarts with a warm fingerprint cache: READY, split, read rate, memory idle and after a mixed load."""
    rows = []
    for run in range(runs):
        endpoint, proc, ready, log = serve(servers, work, f"restart-{run}", ckpt, cache, "--dtype", dtype)
        with Client(endpoint, timeout=900) as client:
            health = client.health()
            idle = rss_kib(proc.pid) * 1024
            touch_every_weight(client)
            used = rss_kib(proc.pid) * 1024
        stop(proc)
        rows.append({"ready": ready, "load": health["load"], "read": read_rate(log), "rss_ready": idle,
                     "rss_used": used, "weights": health["load"]["memory_bytes"]})
    return rows


def idle_daemon(servers, work, ckpt, cache) -> int:
    """Resident memory of a daemon with both models registered and none loaded."""
    endpoint, proc, _, _ = serve(servers, work, "idle", ckpt, cache, "--load", "on-demand")
    with Client(endpoint, timeout=60) as client:
        client.health()
    rss = rss_kib(proc.pid) * 1024
    stop(proc)
    return rss


def quantized(servers, work, ckpt, cache, dtype, fmt: str) -> dict:
    """A first start in `fmt` (converts, writes the cache), then a restart from the cache."""
    endpoint, proc, first, _ = serve(servers, work, f"{fmt}-first", ckpt, cache, "--dtype", dtype, "--quantize", fmt)
    stats = wait_cache_written(endpoint, 2)
    stop(proc)
    endpoint, proc, again, log = serve(servers, work, f"{fmt}-again", ckpt, cache, "--dtype", dtype, "--quantize", fmt)
    cached = "from the weights cache" in log.read_text(errors="replace")
    with Client(endpoint, timeout=60) as client:
        load = client.health()["load"]
    stop(proc)
    return {"first": first, "restart": again, "cache": stats, "from_cache": cached, "read": read_rate(log),
            "load": load}


def on_demand(servers, work, ckpt, cache, dtype, fmt: str) -> float:
    """Seconds the loader took for the embedding model asked for on an on-demand daemon."""
    endpoint, proc, _, _ = serve(servers, work, f"demand-{fmt}", ckpt, cache, "--dtype", dtype, "--quantize", fmt,
                                 "--load", "on-demand")
    with Client(endpoint, timeout=900) as client:
        client.embed(["the first request loads the model"])
        load_s = client.request({"op": "metrics"})["models"]
    stop(proc)
    return next(v["load_s"] for k, v in load_s.items() if k.startswith("embedding:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="use this checkpoint instead of building one")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps: on an accelerator, the files go to it "
                        "through one pinned staging buffer per reading thread")
    args = parser.parse_args()
    DEVICE[1] = args.device
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        ckpt = args.checkpoint or build_tiny_checkpoint(work / "ckpt", replace(QWEN3VL_2B_SPEC, tokenizer="qwen3",
                                                                                dtype=args.dtype))
        cache = work / "cache" / "fingerprints.json"
        baseline(ckpt, args.device, args.dtype)  # the page cache warm
        base = [baseline(ckpt, args.device, args.dtype)[1] for _ in range(args.runs)]
        _, proc, first, first_log = serve(servers, work, "first", ckpt, cache, "--dtype", args.dtype)
        stop(proc)
        fgb, fs = read_rate(first_log)
        rows = restart(servers, work, ckpt, cache, args.dtype, args.runs)
        weights = rows[0]["weights"]
        touch = ceiling(weights)
        idle = idle_daemon(servers, work, ckpt, cache)
        quant = {fmt: quantized(servers, work, ckpt, cache, args.dtype, fmt) for fmt in ("int8", "nf4")}
        demand = {fmt: on_demand(servers, work, ckpt, cache, args.dtype, fmt) for fmt in ("none", "int8")}
    b = float(np.median(base))
    r = float(np.median([row["ready"] for row in rows]))
    w = float(np.median([row["load"]["weights_s"] for row in rows]))
    gb, read_s = rows[-1]["read"]
    print(f"baseline (transformers' load + one forward each): {', '.join(f'{x:.1f}' for x in base)} s")
    for i, row in enumerate(rows):
        print(f"restart {i + 1}: READY {row['ready']:.1f} s, split {row['load']}, read {row['read'][0]:.2f} GB "
              f"in {row['read'][1]:.2f} s")
    print(f"restart READY {r:.1f} s / baseline {b:.1f} s = {r / b:.2f}x (goal <= 1.3x)")
    print(f"weights stage {w:.2f} s for {weights / 1e9:.2f} GB = {weights / w / 1e9:.2f} GB/s (goal >= 3); the reads "
          f"alone {gb / read_s:.2f} GB/s; touching {weights / 1e9:.2f} GB of new memory in a fresh process "
          f"{touch:.2f} s = {weights / touch / 1e9:.2f} GB/s (this host's ceiling for owned memory)")
    used = rows[-1]["rss_used"]
    print(f"resident after a mixed load {used / 1e9:.2f} GB; weights {weights / 1e9:.2f} GB + idle daemon "
          f"{idle / 1e9:.2f} GB = {(weights + idle) / 1e9:.2f} GB; ratio {used / (weights + idle):.3f} "
          f"(goal <= 1.05)")
    print(f"first start (hashing as read) READY {first:.1f} s = {first / r:.2f}x the restart (goal <= 1.6); "
          f"read+hash {fgb:.2f} GB in {fs:.2f} s")
    warm = float(np.median([row["load"]["warmup_s"] for row in rows]))
    for fmt, q in quant.items():
        lw, ww = q["load"]["weights_s"], q["load"]["warmup_s"]
        print(f"{fmt}: first start {q['first']:.1f} s; restart {q['restart']:.1f} s = {q['restart'] / r:.2f}x the "
              f"unquantized restart (goal <= 1.3); without the warm-up forwards (the format's compute, not its "
              f"load: {ww:.1f} s against {warm:.1f} s) {(q['restart'] - ww) / (r - warm):.2f}x; weights stage "
              f"{lw:.1f} s against {w:.1f} s; from the cache: {q['from_cache']}; cache {q['cache']}; "
              f"read {q['read'][0]:.2f} GB in {q['read'][1]:.2f} s")
    print(f"on demand, the embedding model's load: none {demand['none']:.1f} s, int8 {demand['int8']:.1f} s "
          f"({demand['int8'] / demand['none']:.2f}x)")


if __name__ == "__main__":
    main()
