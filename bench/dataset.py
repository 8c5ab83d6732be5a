"""embed-dataset's local mode against the daemon's own best: the same rows sent as 32-input requests
by 8 clients (threads, one client each), in one run, on one daemon (the BENCH_SPEC model, CPU).

    .venv/bin/python -m bench.dataset [--rows 3000] [--rounds 2]

Rows are texts of 5 to 60 words. The job's time is the whole job: reading the JSONL, the requests
(--batch-rows 32, --in-flight 4 by default), the Parquet commits (every 4096 rows and 5 s, synced) and
the summary. The rounds alternate (clients, job, clients, job, ...); the ratio is job rows/s over
client rows/s, by the median of the rounds. The issue's bar: at least 0.9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import Servers
from qwen3vl_client.client import Client
from daemon.dataset.batches import EmbedSettings
from daemon.dataset.job import JobSpec, run_local
from daemon.loading.tiny import BENCH_SPEC, build_tiny_checkpoint

CLIENTS, PER_REQUEST = 8, 32


def make_rows(count: int) -> list[dict]:
    return [{"id": i, "text": f"row {i} " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(5 + i % 56))}
            for i in range(count)]


def clients_rate(endpoint: str, rows: list[dict]) -> float:
    texts = [r["text"] for r in rows]
    requests = [texts[i:i + PER_REQUEST] for i in range(0, len(texts), PER_REQUEST)]
    turn = iter(range(len(requests)))
    lock = threading.Lock()

    def worker() -> None:
        with Client(endpoint, timeout=300) as client:
            while True:
                with lock:
                    index = next(turn, None)
                if index is None:
                    return
                client.embed(requests[index])

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(rows) / (time.perf_counter() - started)


def job_rate(endpoint: str, source: Path, out: Path, batch_rows: int, in_flight: int) -> float:
    spec = JobSpec(input=source, out=out, embed=EmbedSettings(), batch_rows=batch_rows, in_flight=in_flight,
                   overwrite=True, bar=False)
    started = time.perf_counter()
    summary = run_local(spec, lambda: Client(endpoint, timeout=300), threading.Event())
    elapsed = time.perf_counter() - started
    assert summary.written == len(source.read_text().splitlines()), summary
    return summary.written / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        ckpt = build_tiny_checkpoint(work / "ckpt", BENCH_SPEC)
        endpoint = servers.daemon(work, "daemon", ckpt, "--reranker-model", "none")
        rows = make_rows(args.rows)
        source = work / "rows.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        clients_rate(endpoint, rows[:256])  # warm both paths once
        clients, jobs = [], []
        for _ in range(args.rounds):
            clients.append(clients_rate(endpoint, rows))
            jobs.append(job_rate(endpoint, source, work / "out", args.batch_rows, args.in_flight))
        c, j = statistics.median(clients), statistics.median(jobs)
        print(f"rows: {args.rows} texts; rounds: {args.rounds}; job: --batch-rows {args.batch_rows} "
              f"--in-flight {args.in_flight}")
        print(f"{CLIENTS} clients x {PER_REQUEST}-input requests: {c:8.1f} rows/s  "
              f"({', '.join(f'{x:.1f}' for x in clients)})")
        print(f"embed-dataset (local mode):    {j:8.1f} rows/s  ({', '.join(f'{x:.1f}' for x in jobs)})")
        print(f"ratio job / clients: {j / c:.3f} (bar: >= 0.9)")


if __name__ == "__main__":
    main()
