"""Prometheus: the bridge's own request counters and latencies, and the daemon's counters as
families built from one `metrics` reply (daemon/serving/prometheus.py, which the daemon's own exporter uses)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qwen3vl_client.prometheus import DaemonSnapshot
from qwen3vl_client.protocol import MetricsReply

class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qwen3vl_bridge_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("qwen3vl_bridge_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)
        self.daemons = Gauge("qwen3vl_bridge_daemons", "Daemon endpoints the bridge sends requests to now (with "
                             "dns+tcp://: the name's addresses at the last lookup)", registry=self.registry)


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
