"""The long socket fuzz run: at least 100,000 cases against a live daemon on the tiny model.

    .venv/bin/python -m bench.fuzz [--cases 100000] [--seed 0]

Starts a daemon (both models on a fresh tiny checkpoint, `--max-message-bytes 65536` so that
oversized payloads are cheap to send), then sends every case of bench/fuzzing.py through one DEALER
socket: structure-aware payloads, mutated valid requests (corrupt msgpack, images, videos), payloads
over the size limit, each behind a random envelope. A unique tag frame before the random envelope
proves each reply goes to its own case and none is answered twice. Every 1000 cases, and at the end,
a frame over the transport's limit is sent on a fresh socket (the transport drops that sender, no
reply) and a separate client checks health. Prints the counts per outcome, any rule broken, the
daemon's resident memory, and exits 1 if the daemon crashed, a case went unanswered or a rule broke.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import zmq
from hypothesis import HealthCheck, Phase, given, seed, settings

from bench.fuzzing import envelopes, judge, payloads
from bench.harness import Servers, rss_kib

from qwen3vl_client.client import Client
from daemon.loading.tiny import build_tiny_checkpoint

MAX_MESSAGE_BYTES = 65536
REPLY_TIMEOUT_MS = 30_000


class Run:
    def __init__(self, endpoint: str, pid: int, cases: int):
        self.endpoint, self.pid, self.cases = endpoint, pid, cases
        self.ctx = zmq.Context.instance()
        self.sock = self._dealer()
        self.count = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.problems: list[str] = []
        self.unanswered = 0
        self.rss: list[tuple[int, int]] = []
        self.started = time.monotonic()

    def _dealer(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        return sock

    def case(self, envelope: list[bytes], payload: bytes) -> None:
        self.count += 1
        sent = [self.count.to_bytes(8, "big"), *envelope]
        self.sock.send_multipart([*sent, payload])
        if not self.sock.poll(REPLY_TIMEOUT_MS):
            self.unanswered += 1
            self.problems.append(f"case {self.count}: no reply in {REPLY_TIMEOUT_MS} ms to {payload[:80]!r}")
            self.sock.close()
            self.sock = self._dealer()
        else:
            verdict = judge(sent, self.sock.recv_multipart())
            self.outcomes[verdict.outcome] += 1
            if verdict.problem:
                self.problems.append(f"case {self.count}: {verdict.problem}; payload {payload[:80]!r}")
        if self.count % 1000 == 0:
            self.checkpoint()

    def checkpoint(self) -> None:
        """A frame past the transport limit on a fresh socket, then health from a separate client."""
        rogue = self._dealer()
        rogue.send_multipart([b"", b"\0" * (MAX_MESSAGE_BYTES + 2 * 1024 * 1024)])
        if rogue.poll(200):
            self.problems.append(f"after case {self.count}: a frame past the transport limit got a reply")
        rogue.close()
        self.outcomes["transport-dropped"] += 1
        with Client(self.endpoint, timeout=30) as c:
            if c.health()["status"] != "ready":
                self.problems.append(f"after case {self.count}: health not ready")
        self.rss.append((self.count, rss_kib(self.pid)))
        rate = self.count / (time.monotonic() - self.started)
        print(f"  {self.count:>7} cases, {rate:6.0f}/s, daemon RSS {self.rss[-1][1] / 1024:.0f} MiB, "
              f"problems {len(self.problems)}", flush=True)

    def finish(self) -> None:
        if self.sock.poll(1000):
            self.problems.append("a reply arrived after the last case was answered (a duplicate)")
        self.checkpoint()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        endpoint = servers.daemon(work, "fuzz", build_tiny_checkpoint(work / "tiny"),
                                  "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-batch-size", "8")
        daemon = servers.by_name["fuzz"]
        run = Run(endpoint, daemon.pid, args.cases)
        rss_start = rss_kib(daemon.pid)

        # Cases record what they find instead of raising, so Hypothesis only generates.
        @seed(args.seed)
        @settings(max_examples=args.cases, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate])
        @given(envelope=envelopes, payload=payloads(MAX_MESSAGE_BYTES))
        def fuzz(envelope, payload):
            run.case(envelope, payload)

        print(f"fuzzing {endpoint} with {args.cases} cases (seed {args.seed})", flush=True)
        fuzz()
        run.finish()
        crashed = daemon.poll() is not None
        elapsed = time.monotonic() - run.started
    report(run, args, elapsed, rss_start, crashed)
    return 1 if crashed or run.unanswered or run.problems else 0


def report(run: Run, args, elapsed: float, rss_start: int, crashed: bool) -> None:
    print(f"\n{run.count} cases in {elapsed:.0f} s ({run.count / elapsed:.0f}/s), seed {args.seed}, "
          f"{os.cpu_count()} CPUs")
    for outcome, n in run.outcomes.most_common():
        print(f"  {outcome:<18}{n:>8}")
    print(f"unanswered: {run.unanswered}; rules broken: {len(run.problems)}; daemon crashed: {crashed}")
    for problem in run.problems[:20]:
        print(f"  {problem}")
    warm = [kib / 1024 for count, kib in run.rss if count >= 2000] or [run.rss[-1][1] / 1024]
    print(f"daemon RSS: {rss_start / 1024:.0f} MiB at start; from 2000 cases on between {min(warm):.0f} and "
          f"{max(warm):.0f} MiB ({len(warm)} samples), {warm[-1]:.0f} MiB at the end "
          f"({warm[-1] - warm[0]:+.1f} MiB since 2000 cases)")

if __name__ == "__main__":
    sys.exit(main())
