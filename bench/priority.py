"""A search while the store is re-embedded: query latency and batch throughput, with and without
priorities and preemption, in one run.

    .venv/bin/python -m bench.priority [--checkpoint DIR] [--seconds 60] [--emulated]

On the CPU: the embedding model on the 2B shapes in the dtype `--dtype auto` picks (bfloat16 on CPUs
with native bf16, else float32; random weights, Qwen3's tokenizer; built as bench.weights builds it
unless given). With --emulated: the daemon on the emulated accelerator
(bench.emulator: an H100 running the 2B model, its forward stepping through the decoder layers so
that the daemon's layer hooks run) on the tiny checkpoint, with image batches as the bulk work.

For each configuration, a fresh daemon (no reranker):
1. idle: one short text (~35 tokens) at a time, 10 times: the p50 every ratio below is against;
2. bulk alone: 4 clients, each sending 32-input batches back to back (texts of ~128 tokens; with
   --emulated, images), for --seconds: the bulk inputs/s (and tokens/s), counted at forward
   boundaries from the daemon's metrics;
3. bulk with queries: the same bulk, and one query every 2 s (--query-every) for --seconds: the queries' p50, p95
   and max latency (and their ratio to the idle p50), and the bulk throughput with the device time
   the queries' own forwards take set aside (their count x the idle p50: "adj. ratio"; the daemon's
   own count of its interactive forwards' seconds: "meas. ratio"), as a ratio to 2.

Configurations: `before` (the daemon as it was: everything interactive, no preemption; on the CPU
--max-batch-tokens 4096, the old default), `priorities` (bulk sent with priority batch, no
preemption) and `preemption` (bulk as batch, preemption on: the defaults).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.harness import ROOT, Servers, gradient_png
from bench.run import WORDS
from qwen3vl_client.client import Client, DaemonError, DaemonTimeout, DaemonUnavailable

QUERY_EVERY_S = 2.0
CLIENTS, BULK_SIZE = 4, 32
IMAGES: list[bytes] = []  # the emulated bulk's images (the daemon's image cache is off: each is decoded)


@dataclass(frozen=True)
class Config:
    name: str
    daemon_args: tuple[str, ...]
    bulk_priority: str | None  # None: not sent (interactive)


CPU_CONFIGS = (Config("before", ("--max-batch-tokens", "4096", "--no-preempt"), None),
               Config("priorities", ("--no-preempt",), "batch"),
               Config("preemption", (), "batch"))
EMULATED_CONFIGS = (Config("before", ("--no-preempt",), None),
                    Config("priorities", ("--no-preempt",), "batch"),
                    Config("preemption", (), "batch"))


def text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 13 + i * i * seed) % len(WORDS)] for i in range(words)) + f" {seed}"


def query_text(seed: int) -> str:
    return text(10_000 + seed, 14)  # ~35 tokens with the template


@dataclass
class Bulk:
    """Clients sending bulk batches back to back until stopped."""

    endpoint: str
    priority: str | None
    emulated: bool
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    tokens_per_input: float = 0.0

    def inputs(self, seed: int) -> list:
        if self.emulated:  # made once: making PNGs here would take this process's GIL from the queries
            return [{"image": IMAGES[(seed * BULK_SIZE + i) % len(IMAGES)]} for i in range(BULK_SIZE)]
        return [text(seed * BULK_SIZE + i, 100) for i in range(BULK_SIZE)]  # ~128 tokens with the template

    def run(self, worker: int) -> None:
        with Client(self.endpoint, timeout=3600) as client:
            seed = worker
            while not self.stop.is_set():
                try:
                    reply = client.embed(self.inputs(seed), priority=self.priority)
                    self.tokens_per_input = self.tokens_per_input or reply.tokens / reply.count
                except (DaemonError, DaemonTimeout, DaemonUnavailable):
                    if self.stop.is_set():
                        return
                    time.sleep(0.1)
                seed += CLIENTS

    def start(self) -> None:
        for worker in range(CLIENTS):
            threading.Thread(target=self.run, args=(worker,), daemon=True).start()


class Progress:
    """The bulk inputs forwarded so far, polled from the daemon's metrics: the batch class's when the
    bulk is sent as batch, else every input forwarded less the queries (one input each) answered."""

    def __init__(self, endpoint: str, by_class: bool):
        self.client = Client(endpoint, timeout=30)
        self.queries, self.by_class = 0, by_class

    def bulk_inputs(self) -> int:
        return self.sample()[0]

    def sample(self) -> tuple[int, float]:
        """(bulk inputs forwarded, seconds of interactive forwards) so far; the second only where
        the bulk is its own class (else nan)."""
        metrics = self.client.request({"op": "metrics"})
        if self.by_class:
            classes = metrics["priorities"]
            return int(classes["batch"]["batched_inputs"]), float(classes["interactive"]["forward_s"])
        return int(metrics["batch_size"]["sum"]) - self.queries, float("nan")

    def watch(self, seconds: float, during=None) -> tuple[float, float, float, int]:
        """(seconds, bulk inputs, seconds of interactive forwards) between the first and the last
        bulk forward that ended within the window, and the forwards seen; `during(now)` is called
        every poll."""
        end = time.monotonic() + seconds
        last = self.bulk_inputs()
        marks = []
        while time.monotonic() < end:
            if during is not None:
                during(time.monotonic())
            time.sleep(0.05)
            now, (value, interactive_s) = time.monotonic(), self.sample()
            # A bulk forward adds several inputs; a query's (counted before its reply) only one.
            if value >= last + 2:
                marks.append((now, value, interactive_s))
                last = value
        if len(marks) < 2:
            return 0.0, 0.0, 0.0, len(marks)
        first, final = marks[0], marks[-1]
        return final[0] - first[0], final[1] - first[1], final[2] - first[2], len(marks)


def idle_latency(endpoint: str, progress: Progress, bulk: "Bulk") -> list[float]:
    """The idle one-text latencies (after 3 warm-up queries); also counts a bulk input's tokens."""
    with Client(endpoint, timeout=600) as client:
        for i in range(3):
            client.embed([query_text(900 + i)])
            progress.queries += 1
        if not bulk.emulated:
            one = client.embed(bulk.inputs(10_000)[:1])
            bulk.tokens_per_input = one.tokens
            progress.queries += 1
        times = []
        for i in range(10):
            began = time.perf_counter()
            client.embed([query_text(i)])
            times.append(time.perf_counter() - began)
            progress.queries += 1
    return times


class Queries:
    """One query every `every_s` on its own thread (a slow one does not delay the next)."""

    def __init__(self, endpoint: str, progress: Progress, every_s: float):
        self.endpoint, self.progress, self.every_s = endpoint, progress, every_s
        self.latencies: list[float] = []
        self.next_at, self.seed, self.threads = time.monotonic(), 100, []

    def tick(self, now: float) -> None:
        if now >= self.next_at:
            self.next_at += self.every_s
            self.seed += 1
            thread = threading.Thread(target=self.one, args=(self.seed,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def one(self, seed: int) -> None:
        with Client(self.endpoint, timeout=3600) as client:
            began = time.perf_counter()
            client.embed([query_text(seed)])
            self.latencies.append(time.perf_counter() - began)
            self.progress.queries += 1

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def auto_dtype() -> str:
    """What --dtype auto is on this CPU: bfloat16 where it has native bf16, else float32."""
    import torch

    from daemon.loading.devices import resolve_dtype

    return str(resolve_dtype("auto", torch.device("cpu"))).replace("torch.", "")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_config(servers: Servers, work: Path, ckpt: Path, config: Config, seconds: float, emulated: bool,
               extra: tuple[str, ...], every_s: float = QUERY_EVERY_S) -> dict:
    runner = (("-m", "bench.emulator", "--log", str(work / f"{config.name}.npz"), "--no-stages", "--")
              if emulated else ("-m", "daemon"))
    endpoint = servers.daemon(work, config.name, ckpt, "--reranker-model", "none", *extra, *config.daemon_args,
                              runner=runner)
    progress = Progress(endpoint, by_class=config.bulk_priority == "batch")
    bulk = Bulk(endpoint, config.bulk_priority, emulated)
    idle = idle_latency(endpoint, progress, bulk)
    idle_p50 = statistics.median(idle)
    bulk.start()
    while progress.bulk_inputs() == 0:  # the first bulk forward has ended: the pipeline is full
        time.sleep(0.05)
    alone_s, alone_n, _, alone_forwards = progress.watch(seconds)
    queries = Queries(endpoint, progress, every_s)
    mixed_s, mixed_n, queries_s, mixed_forwards = progress.watch(seconds, during=queries.tick)
    queries.join()
    bulk.stop.set()
    proc = servers.by_name[config.name]
    proc.kill()  # not drained: the next configuration must not share the CPU with its last forward
    proc.wait(60)
    alone_rate = alone_n / alone_s if alone_s else 0.0
    mixed_rate = mixed_n / mixed_s if mixed_s else 0.0
    # The queries' own device time set aside, as the issue counts it (their count within the span
    # the bulk rate is measured over, x the idle p50; every query was sent within the window) and
    # as the daemon measured it (its interactive forwards' seconds in that span).
    by_count = mixed_s - len(queries.latencies) * (mixed_s / seconds) * idle_p50
    by_metrics = mixed_s - queries_s
    adjusted = mixed_n / by_count if by_count > 0 else 0.0
    measured = mixed_n / by_metrics if by_metrics > 0 else float("nan")
    lat = queries.latencies
    return {"config": config.name, "idle_p50": idle_p50, "queries": len(lat), "p50": pct(lat, 0.5),
            "p95": pct(lat, 0.95), "max": max(lat), "alone_rate": alone_rate, "mixed_rate": mixed_rate,
            "adjusted_ratio": adjusted / alone_rate if alone_rate else 0.0,
            "measured_ratio": measured / alone_rate if alone_rate else float("nan"), "tokens_per_input": bulk.tokens_per_input,
            "forwards": (alone_forwards, mixed_forwards)}


def report(rows: list[dict], unit: str) -> None:
    print(f"\n{'config':<11} {'idle p50':>9} {'queries':>7} {'q p50':>8} {'q p95':>8} {'q max':>8} "
          f"{'p95/idle':>8} {'max/idle':>8} {'bulk alone':>11} {'with q':>9} {'adj. ratio':>10} {'meas. ratio':>11} "
          f"{'forwards':>9}")
    for r in rows:
        print(f"{r['config']:<11} {r['idle_p50']:>8.3f}s {r['queries']:>7} {r['p50']:>7.3f}s {r['p95']:>7.3f}s "
              f"{r['max']:>7.3f}s {r['p95'] / r['idle_p50']:>8.1f} {r['max'] / r['idle_p50']:>8.1f} "
              f"{r['alone_rate']:>7.2f} {unit} {r['mixed_rate']:>5.2f} {unit} {r['adjusted_ratio']:>10.2f} "
              f"{r['measured_ratio']:>11.2f} {r['forwards'][0]:>4}/{r['forwards'][1]:<4}")
    for r in rows:
        print(f"  {r['config']}: ~{r['tokens_per_input']:.0f} tokens per bulk input: "
              f"{r['alone_rate'] * r['tokens_per_input']:.0f} tokens/s alone")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--emulated", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated configurations to run")
    parser.add_argument("--query-every", type=float, default=QUERY_EVERY_S, help="seconds between queries")
    args = parser.parse_args()
    configs = EMULATED_CONFIGS if args.emulated else CPU_CONFIGS
    if args.only:
        configs = tuple(c for c in configs if c.name in args.only.split(","))
    # The emulated accelerator gets the settings the daemon picks on a GPU (as bench.emulated does),
    # and no image cache, so that every bulk image is decoded as a new one would be.
    extra = (("--device", "cpu", "--dtype", "float32", "--max-batch-tokens", "32768", "--image-cache-bytes", "0")
             if args.emulated else ("--device", "cpu", "--dtype", "auto"))
    if args.emulated:
        IMAGES.extend(gradient_png(seed, size=(448, 448)) for seed in range(2 * BULK_SIZE))
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            from daemon.loading.tiny import QWEN3VL_2B_SPEC, TinySpec, build_tiny_checkpoint

            spec = TinySpec() if args.emulated else replace(QWEN3VL_2B_SPEC, tokenizer="qwen3", dtype="bfloat16")
            ckpt = build_tiny_checkpoint(work / "ckpt", spec)
        print(f"{'emulated accelerator, image bulk' if args.emulated else f'CPU, 2B shapes, {auto_dtype()}, text bulk'}; "
              f"{CLIENTS} bulk clients x {BULK_SIZE} inputs; a query every {args.query_every:g} s for {args.seconds:g} s; "
              f"{os.cpu_count()} CPUs", flush=True)
        rows = []
        for config in configs:
            rows.append(run_config(servers, work, ckpt, config, args.seconds, args.emulated, extra, args.query_every))
            print(rows[-1], flush=True)
        report(rows, "in/s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
