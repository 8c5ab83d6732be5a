"""Models on demand: a request for an unloaded model, beside the daemon's time to READY; and another
model's latency while that load runs, against the same model idle. One run, one machine.

    .venv/bin/python -m bench.on_demand [--device cpu] [--dtype bfloat16] [--checkpoint DIR] [--runs 3]

Builds a random-weight checkpoint of the Qwen3-VL-2B shape (bf16, Qwen3's tokenizer; about a
minute) unless given one, and a small model (BENCH_SPEC) to serve beside it. Then, each daemon in a
fresh process with the files in the page cache:
- READY: `serve --load at-start` with the 2B-shaped model as the only embedding model, from spawn to
  health saying ready;
- cold request: `serve --load on-demand` with both models; the time from sending one short embed
  for the 2B-shaped model (unloaded) to its reply, and the daemon's own load seconds for it;
- the other model during the load: one-text embeds for the small model, back to back, first idle
  (nothing else happening), then while the 2B-shaped model loads (health says `loading`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.harness import ROOT, Servers, wait_daemon_ready
from qwen3vl_client.client import Client
from daemon.loading.tiny import BENCH_SPEC, QWEN3VL_2B_SPEC, build_tiny_checkpoint


def start(servers: Servers, work: Path, name: str, *args: str) -> tuple[str, float]:
    """A daemon serving `args`' models; its endpoint and seconds from spawn to ready."""
    endpoint = f"ipc://{work}/{name}/daemon.sock"
    began = time.monotonic()
    proc = servers.spawn([sys.executable, "-m", "daemon", "serve", "--endpoint", endpoint, "--reranker-model",
                          "none", "--log-level", "warning", *args], name=name, log=work / f"{name}.log",
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    wait_daemon_ready(endpoint, proc, timeout_s=900)
    return endpoint, time.monotonic() - began


def state(client: Client, name: str) -> dict:
    return next(row for row in client.health()["models"] if row["name"] == name)


def latencies(client: Client, model: str, keep_going, at_least: int = 5) -> list[float]:
    """One-text embeds for `model`, back to back, while `keep_going()` (and at least `at_least`)."""
    found = []
    while keep_going() or len(found) < at_least:
        began = time.perf_counter()
        client.embed([f"a short query {len(found)}"], model=model)
        found.append(time.perf_counter() - began)
    return found


def one_run(servers: Servers, work: Path, big: Path, small: Path, common: list[str], run: int) -> dict:
    _, ready = start(servers, work, f"at-start-{run}", "--embedding-model", f"big={big}", *common)
    endpoint, _ = start(servers, work, f"on-demand-{run}", "--load", "on-demand", "--embedding-model",
                        f"small={small}", "--embedding-model", f"big={big}", *common)
    with Client(endpoint, timeout=900) as client, Client(endpoint, timeout=900) as cold:
        client.embed(["load the small model"], model="small")
        t0 = time.monotonic()
        idle = latencies(client, "small", lambda: time.monotonic() - t0 < 3.0)
        outcome: dict = {}

        def ask_big() -> None:
            began = time.perf_counter()
            cold.embed(["the first request for the big model"], model="big")
            outcome["seconds"] = time.perf_counter() - began

        asker = threading.Thread(target=ask_big)
        asker.start()
        while state(client, "big")["state"] != "loading" and asker.is_alive():
            time.sleep(0.01)
        during = latencies(client, "small", lambda: state(client, "big")["state"] == "loading")
        asker.join()
        load_s = client.request({"op": "metrics"})["models"]["embedding:big"]["load_s"]
    return {"ready": ready, "cold": outcome["seconds"], "load_s": load_s, "idle": idle, "during": during}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=None, help="the big model (default: build a 2B shape)")
    args = parser.parse_args()
    common = ["--device", args.device, "--dtype", args.dtype]
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        t0 = time.monotonic()
        big = args.checkpoint or build_tiny_checkpoint(work / "big", replace(QWEN3VL_2B_SPEC, tokenizer="qwen3",
                                                                              dtype="bfloat16"))
        small = build_tiny_checkpoint(work / "small", replace(BENCH_SPEC, tokenizer="qwen3"))
        print(f"checkpoints ready in {time.monotonic() - t0:.0f} s", flush=True)
        runs = []
        for run in range(args.runs):
            runs.append(one_run(servers, work, big, small, common, run))
            r = runs[-1]
            print(f"run {run + 1}: READY (at-start, big) {r['ready']:.1f} s; first request for big, unloaded, "
                  f"to its reply {r['cold']:.1f} s (its load {r['load_s']:.1f} s); small one-text p50 idle "
                  f"{np.median(r['idle']) * 1e3:.1f} ms ({len(r['idle'])}), during the load "
                  f"{np.median(r['during']) * 1e3:.1f} ms ({len(r['during'])})", flush=True)
    ready, cold = (float(np.median([r[k] for r in runs])) for k in ("ready", "cold"))
    idle = np.concatenate([r["idle"] for r in runs])
    during = np.concatenate([r["during"] for r in runs])
    print(f"median over {len(runs)} runs: cold request {cold:.1f} s / time to READY {ready:.1f} s = {cold / ready:.2f}x")
    print(f"small model during a load: p50 {np.median(during) * 1e3:.1f} ms vs idle {np.median(idle) * 1e3:.1f} ms "
          f"= {np.median(during) / np.median(idle):.2f}x; p90 {np.percentile(during, 90) * 1e3:.1f} ms vs "
          f"{np.percentile(idle, 90) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
