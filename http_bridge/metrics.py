"""Prometheus: the bridge's own request counters and latencies, and the daemon's counters as
families built from one `metrics` reply."""

from __future__ import annotations

import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from daemon.protocol import MetricsReply

class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qwen3vl_bridge_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("qwen3vl_bridge_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)


class DaemonSnapshot:
    """Prometheus families built from one `metrics` reply of the daemon."""

    def __init__(self, snapshot: MetricsReply):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot
        for name, doc, label in (("requests", "Requests received", "op"), ("errors", "Error replies", "code"),
                                 ("inputs", "Inputs of successful requests", "op"),
                                 ("tokens", "Tokens processed", "op")):
            family = CounterMetricFamily(f"qwen3vl_daemon_{name}", doc, labels=[label])
            for value, count in sorted(getattr(s, name).items()):
                family.add_metric([value], count)
            yield family
        for name in ("queue_depth", "queued_tokens"):
            yield GaugeMetricFamily(f"qwen3vl_daemon_{name}", f"Daemon {name.replace('_', ' ')}",
                                    value=getattr(s, name))
        for name in ("forward_s", "queue_wait_s"):
            yield CounterMetricFamily(f"qwen3vl_daemon_{name[:-2]}_seconds", f"Daemon {name[:-2]} time",
                                      value=getattr(s, name))
        latency = HistogramMetricFamily("qwen3vl_daemon_request_seconds", "Daemon request latency", labels=["op"])
        for op, hist in sorted(s.latency_s.items()):
            latency.add_metric([op], _buckets(hist), hist["sum"])
        yield latency
        batch = s.batch_size
        if batch:
            family = HistogramMetricFamily("qwen3vl_daemon_batch_size", "Inputs per forward pass")
            family.add_metric([], _buckets(batch), batch["sum"])
            yield family
        yield from _per_model(s.models)


# Per model (the daemon's name for it, `task:name`): what its forwards and its loads took.
MODEL_COUNTERS = (("batches", "qwen3vl_daemon_model_batches", "Forward passes"),
                  ("batched_inputs", "qwen3vl_daemon_model_inputs", "Inputs in forward passes"),
                  ("forward_s", "qwen3vl_daemon_model_forward_seconds", "Time in forward passes"),
                  ("loads", "qwen3vl_daemon_model_loads", "Times the model was loaded"),
                  ("unloads", "qwen3vl_daemon_model_unloads", "Times the model was unloaded"),
                  ("load_s", "qwen3vl_daemon_model_load_seconds", "Time loading the model"))
MODEL_STATES = ("unloaded", "loading", "loaded", "failed")


def _per_model(models: dict) -> Iterator:
    if not models:
        return
    for field, name, help in MODEL_COUNTERS:
        family = CounterMetricFamily(name, help, labels=["model"])
        for model, values in sorted(models.items()):
            family.add_metric([model], float(values.get(field, 0)))
        yield family
    states = GaugeMetricFamily("qwen3vl_daemon_model_state", "1 for the model's state", labels=["model", "state"])
    for model, values in sorted(models.items()):
        for state in MODEL_STATES:
            states.add_metric([model, state], 1.0 if values.get("state") == state else 0.0)
    yield states


def _buckets(hist: dict) -> list[tuple[str, float]]:
    bounds = [str(float(b)) for b in hist["buckets"]] + ["+Inf"]
    return list(zip(bounds, hist["counts"]))


class Measure:
    """ASGI middleware: count requests by route and status, and time them (a plain ASGI wrapper:
    Starlette's BaseHTTPMiddleware costs far more per request)."""

    def __init__(self, app, metrics: BridgeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            path = route.path if route is not None else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def exposition(metrics: BridgeMetrics, daemon_snapshot: MetricsReply | None) -> bytes:
    """Prometheus text: the bridge's metrics, then the daemon's when it answered."""
    text = generate_latest(metrics.registry)
    if daemon_snapshot is not None:
        registry = CollectorRegistry()
        registry.register(DaemonSnapshot(daemon_snapshot))
        text += generate_latest(registry)
    return text
