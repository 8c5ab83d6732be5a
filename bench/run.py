"""The benchmark: every number side by side from one run, printed as one table of ratios.

    .venv/bin/python -m bench.run                 # CPU, tiny + bench models (a few minutes on 2 cores)
    .venv/bin/python -m bench.run --device cuda --big 2b   # see bench/gpu.sh

It builds its random-weight checkpoints, starts every server itself (the daemon, a bare pyzmq ROUTER
echo, a minimal FastAPI app under uvicorn), and measures:
 1. round trips: daemon `health` vs the echo floor and vs FastAPI `GET /health`; one-text `embed`
    over IPC vs the same embed in-process;
 2. batching efficiency: 32 concurrent clients vs the model's own in-process throughput at batch 32;
 3. rerank 1 x 64: vs one forward per pair (tiny model), vs one batched forward (bench model);
 4. the text fast path vs the processor path;
 5. latency under load and the queue-wait share.
Absolute times drift on a shared machine; the ratios are what count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import ROOT, Servers, free_port, wait_http

from qwen3vl_client.client import AsyncClient, Client
from daemon.config import MediaPolicy, ModelSettings
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import InputItem
from daemon.loading.tiny import BENCH_SPEC, QWEN3VL_2B_SPEC, build_tiny_checkpoint

WORDS = ("memory server embeds reranks text images video local daemon socket batch token model query "
         "document vector search rust client python latency throughput").split()


def sample_texts(n: int, seed: int = 0, lo: int = 8, hi: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(lo, hi))) for _ in range(n)]


# -- servers ----------------------------------------------------------------------------------------
ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1]); print("ready", flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""

FASTAPI_SERVER = """
import sys, uvicorn
from fastapi import FastAPI
app = FastAPI()
@app.get("/health")
def health():
    return {"status": "ok"}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


# -- timing helpers ---------------------------------------------------------------------------------
def timed(call, n: int, warmup: int = 20) -> np.ndarray:
    """Seconds per call; a call that returns a float reports its own duration (see idle_then)."""
    for _ in range(warmup):
        call()
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        own = call()
        out[i] = own if isinstance(own, float) else time.perf_counter() - t0
    return out


def idle_then(call):
    """The call after 1 ms of sleep: what a server pays when a request finds it idle."""
    def run():
        time.sleep(0.001)
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0
    return run


def best_of(call, repeats: int) -> float:
    call()
    return min(timed(call, repeats, warmup=0))


async def load(endpoint: str, texts: list[str], clients: int, seconds: float) -> tuple[int, float]:
    """`clients` concurrent senders of one-text embeds; returns (requests done, elapsed)."""
    client = AsyncClient(endpoint, timeout=120)
    done = 0
    stop = time.monotonic() + seconds

    async def sender(k: int) -> None:
        nonlocal done
        i = k
        while time.monotonic() < stop:
            await client.embed([texts[i % len(texts)]])
            done += 1
            i += clients

    start = time.monotonic()
    await asyncio.gather(*(sender(k) for k in range(clients)))
    elapsed = time.monotonic() - start
    await client.close()
    return done, elapsed


def load_in_subprocess(endpoint: str, clients: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.run", "--load-worker", endpoint, str(clients), str(seconds)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


# -- in-process baselines ---------------------------------------------------------------------------
def models(ckpt: Path, device: str):
    from daemon.models import EmbeddingModel, RerankerModel

    media = MediaReader(MediaPolicy())
    return (EmbeddingModel(ModelSettings(str(ckpt), device=device), media),
            RerankerModel(ModelSettings(str(ckpt), device=device, max_length=10240), media))


def inproc_embed(embedder, text: str):
    from daemon.models import cut_and_normalize

    def run():
        feats = [embedder.prepare(InputItem("inputs[0]", texts=(text,)))]
        return cut_and_normalize(embedder.embed(feats).numpy(), embedder.hidden_size, True).astype("<f4").tobytes()
    return run


def official_rerank_one_by_one(reranker, query: str, docs: list[str]):
    """What the official code does: processor path, one forward per pair."""
    q = InputItem("query", texts=(query,))
    items = [InputItem(f"documents[{i}]", texts=(d,)) for i, d in enumerate(docs)]
    return lambda: [reranker.score([reranker.prepare(q, d, fast=False)]) for d in items]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


# -- the run ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--big", choices=("bench", "2b"), default="bench", help="the compute-bound model's shape")
    parser.add_argument("--requests", type=int, default=400, help="sequential requests per round-trip row")
    parser.add_argument("--load-seconds", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []  # (measure, value, goal, met)
    servers = Servers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            rows = run(args, work, servers)
        finally:
            servers.close()
    table = render(rows, args)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


def run(args, work: Path, servers: Servers) -> list:
    rows = []
    dev = args.device
    tiny = build_tiny_checkpoint(work / "tiny")
    big = build_tiny_checkpoint(work / "big", BENCH_SPEC if args.big == "bench" else QWEN3VL_2B_SPEC)
    common = ["--device", dev, "--max-batch-size", "64"]  # the token budget is the daemon's default for the device
    tiny_ep = servers.daemon(work, "tiny", tiny, *common)
    big_ep = servers.daemon(work, "big", big, *common)
    echo_ep = f"ipc://{work}/echo.sock"
    echo = servers.spawn([sys.executable, "-c", ECHO_SERVER, echo_ep])
    echo.stdout.readline()
    port = free_port()
    servers.spawn([sys.executable, "-c", FASTAPI_SERVER, str(port)])
    wait_http(f"http://127.0.0.1:{port}/health")
    import httpx
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}")
    bridge = httpx.Client(base_url=servers.bridge(work, "bridge", tiny_ep))

    # 1. round trips. Daemon rows first: in-process torch work leaves this process's OpenMP threads
    # spinning for a while, which would steal the CPU from the servers.
    n = args.requests
    text = sample_texts(1, seed=3)[0]
    with Client(echo_ep) as e, Client(tiny_ep) as d:
        t_echo = np.median(timed(lambda: e.request({"op": "health"}), n))
        t_health = np.median(timed(lambda: d.health(), n))
        t_http = np.median(timed(lambda: http.get("/health").json(), n))
        t_ipc_embed = np.median(timed(lambda: d.embed([text]), n))
        t_bridge_health = np.median(timed(lambda: bridge.get("/health").json(), n))
        t_bridge_embed = np.median(timed(lambda: bridge.post("/embed", json={"texts": [text]}).json(), n))
    time.sleep(1.0)
    embedder, reranker = models(tiny, dev)
    t_inproc_embed = np.median(timed(inproc_embed(embedder, text), n))
    t_inproc_idle = np.median(timed(idle_then(inproc_embed(embedder, text)), n // 2))
    rows += [
        ("echo round trip (bare pyzmq ROUTER, floor)", f"{t_echo * 1e3:.3f} ms", "", ""),
        ("health over IPC / echo", f"{t_health / t_echo:.2f}x ({t_health * 1e3:.3f} ms)", "<= 1.3x",
         _met(t_health / t_echo <= 1.3)),
        ("FastAPI GET /health / daemon health", f"{t_http / t_health:.1f}x ({t_http * 1e3:.3f} ms)", ">= 3x",
         _met(t_http / t_health >= 3)),
        ("one-text embed: IPC minus in-process back-to-back, in echo round trips",
         f"{(t_ipc_embed - t_inproc_embed) / t_echo:.2f} ({t_ipc_embed * 1e3:.3f} vs {t_inproc_embed * 1e3:.3f} ms)",
         "<= 1.5", _met((t_ipc_embed - t_inproc_embed) / t_echo <= 1.5)),
        ("one-text embed: IPC minus in-process after 1 ms idle (as a server waits), in echo round trips",
         f"{(t_ipc_embed - t_inproc_idle) / t_echo:.2f} (in-process {t_inproc_idle * 1e3:.3f} ms)", "", ""),
        ("HTTP bridge: GET /health (daemon health inside)", f"{t_bridge_health * 1e3:.3f} ms "
         f"({t_bridge_health / t_health:.1f}x IPC health)", "", ""),
        ("HTTP bridge: POST /embed one text", f"{t_bridge_embed * 1e3:.3f} ms "
         f"(+{(t_bridge_embed - t_ipc_embed) * 1e3:.3f} ms over IPC)", "", ""),
    ]

    # 2. batching efficiency (tiny), with 5. latency under load measured meanwhile
    texts = sample_texts(512, seed=1)
    time.sleep(1.0)
    with Client(tiny_ep) as probe:
        before = probe.health()["stats"]
        loader = load_in_subprocess(tiny_ep, 32, args.load_seconds)
        time.sleep(1.0)
        lat = []
        while loader.poll() is None:
            t0 = time.perf_counter()
            probe.embed([text])
            lat.append(time.perf_counter() - t0)
            time.sleep(0.02)
        after = probe.health()["stats"]
    done, elapsed = map(float, loader.stdout.read().split())
    tput = done / elapsed
    feats_32 = lambda: embedder.embed([embedder.prepare(InputItem("i", texts=(t,))) for t in texts[:32]])  # noqa
    inproc_tput = 32 / best_of(feats_32, 5)
    units = after["batched_inputs"] - before["batched_inputs"]
    waited = after["queue_wait_s"] - before["queue_wait_s"]
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    rows += [
        ("32 clients, one-text embeds: throughput / in-process batch-32 throughput",
         f"{tput / inproc_tput:.2f} ({tput:.0f} vs {inproc_tput:.0f} texts/s)", ">= 0.8", _met(tput / inproc_tput >= 0.8)),
        ("mean batch size under that load", f"{units / max(1, after['batches'] - before['batches']):.1f}", "", ""),
        ("one-text embed latency under load, p50 / p99", f"{p50 * 1e3:.1f} / {p99 * 1e3:.1f} ms", "", ""),
        ("queue-wait share of request latency (mean wait / mean latency)",
         f"{(waited / max(units, 1)) / (done and elapsed * 32 / done):.2f}", "", ""),
    ]

    # 3. rerank 1 x 64
    query, docs = "which document talks about batching", sample_texts(64, seed=2)
    time.sleep(1.0)
    with Client(tiny_ep) as d:
        t_tiny_daemon = best_of(lambda: d.rerank(query, docs), 5)
    t_one_by_one = best_of(official_rerank_one_by_one(reranker, query, docs), 2)
    rows.append(("rerank 1x64, tiny: one forward per pair (official) / daemon",
                 f"{t_one_by_one / t_tiny_daemon:.1f}x ({t_one_by_one * 1e3:.0f} vs {t_tiny_daemon * 1e3:.0f} ms)",
                 ">= 3x", _met(t_one_by_one / t_tiny_daemon >= 3)))
    del embedder, reranker
    time.sleep(1.0)
    with Client(big_ep, timeout=600) as d:
        t_big_daemon = best_of(lambda: d.rerank(query, docs), 3)
    time.sleep(1.0)
    _, big_reranker = models(big, dev)
    q = InputItem("query", texts=(query,))
    feats = [big_reranker.prepare(q, InputItem("d", texts=(doc,))) for doc in docs]

    def floor():
        big_reranker.score(feats)
        sync(dev)
    t_floor = best_of(floor, 3)
    rows.append((f"rerank 1x64, {args.big} model: daemon / one in-process batched forward",
                 f"{t_big_daemon / t_floor:.3f}x ({t_big_daemon * 1e3:.0f} vs {t_floor * 1e3:.0f} ms)", "<= 1.15x",
                 _met(t_big_daemon / t_floor <= 1.15)))

    # 4. text fast path
    prep_texts = sample_texts(200, seed=4)
    items = [InputItem("i", texts=(t,)) for t in prep_texts]
    t_fast = best_of(lambda: [big_reranker.prepare(q, it) for it in items], 3) / len(items)
    t_slow = best_of(lambda: [big_reranker.prepare(q, it, fast=False) for it in items], 3) / len(items)
    embedder, _ = models(tiny, "cpu")
    e_fast = best_of(lambda: [embedder.prepare(it) for it in items], 3) / len(items)
    e_slow = best_of(lambda: [embedder.prepare(it, fast=False) for it in items], 3) / len(items)
    rows += [
        ("text preprocessing per input, embed: processor path / fast path",
         f"{e_slow / e_fast:.1f}x ({e_slow * 1e6:.0f} vs {e_fast * 1e6:.0f} us)", ">= 5x", _met(e_slow / e_fast >= 5)),
        ("text preprocessing per pair, rerank: processor path / fast path",
         f"{t_slow / t_fast:.1f}x ({t_slow * 1e6:.0f} vs {t_fast * 1e6:.0f} us)", ">= 5x", _met(t_slow / t_fast >= 5)),
    ]
    return rows


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def render(rows, args) -> str:
    import torch

    head = (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, device {args.device}"
            + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
            + f"; compute-bound model: {args.big}")
    lines = [head, "", "| measure | result | goal | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {v} | {g} | {ok} |" for m, v, g, ok in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load-worker":
        endpoint, clients, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        done, elapsed = asyncio.run(load(endpoint, sample_texts(512, seed=1), clients, seconds))
        print(done, elapsed)
    else:
        main()
