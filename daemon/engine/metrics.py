"""The daemon's own counters, served by the `metrics` op (and exported by the bridge as Prometheus).

Plain counters and cumulative histograms behind one lock; nothing here knows about transport.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def to_wire(self) -> dict:
        """Cumulative counts per upper bound, as Prometheus exposes them."""
        cumulative, total = [], 0
        for count in self.counts:
            total += count
            cumulative.append(total)
        return {"buckets": list(self.buckets), "counts": cumulative, "sum": self.sum}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by op
        self.errors: Counter[str] = Counter()  # by error code
        self.tokens: Counter[str] = Counter()  # by op
        self.inputs: Counter[str] = Counter()  # by op
        self.latency = {op: Histogram(LATENCY_BUCKETS_S) for op in ("embed", "rerank")}
        self.batch_size = Histogram(BATCH_SIZE_BUCKETS)
        self.forward_s = 0.0  # time in forwards
        self.queue_wait_s = 0.0  # summed waits of ready inputs before their forward began
        self.models: dict[str, dict] = {}  # per model name: batches, batched_inputs, forward_s
        # Per priority class: batches, batched_inputs, forward_s (its own time: a paused batch
        # forward's excludes the interactive forwards run inside it).
        self.priorities: dict[str, dict] = {}

    def request(self, op: str) -> None:
        with self._lock:
            self.requests[op] += 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def done(self, op: str, seconds: float, inputs: int, tokens: int) -> None:
        with self._lock:
            self.latency[op].observe(seconds)
            self.inputs[op] += inputs
            self.tokens[op] += tokens

    def batch(self, size: int, forward_s: float, waited_s: float, model: str | None = None,
              priority: str | None = None) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.forward_s += forward_s
            self.queue_wait_s += waited_s
            for table, key in ((self.models, model), (self.priorities, priority)):
                if key is not None:
                    mine = table.setdefault(key, {"batches": 0, "batched_inputs": 0, "forward_s": 0.0})
                    mine["batches"] += 1
                    mine["batched_inputs"] += size
                    mine["forward_s"] += forward_s

    def batching(self) -> dict:
        """Batch counters: forwards run, inputs they held, time in them, time inputs waited."""
        with self._lock:
            return {"batches": sum(self.batch_size.counts), "batched_inputs": int(self.batch_size.sum),
                    "forward_s": self.forward_s, "queue_wait_s": self.queue_wait_s}

    def to_wire(self) -> dict:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "inputs": dict(self.inputs),
                "tokens": dict(self.tokens),
                "latency_s": {op: h.to_wire() for op, h in self.latency.items()},
                "batch_size": self.batch_size.to_wire(),
                "forward_s": self.forward_s,
                "queue_wait_s": self.queue_wait_s,
                "models": {name: dict(values) for name, values in self.models.items()},
                "priorities": {name: dict(values) for name, values in self.priorities.items()},
            }
