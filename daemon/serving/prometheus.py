"""The daemon's own `/metrics` endpoint (`--metrics-address`): what a Kubernetes HPA scales on
(prometheus-adapter reads `qwen3vl_daemon_queue_depth` per pod) and what readiness looks like from
outside. Its families are qwen3vl_client.prometheus's, which the bridge serves too for the daemon that
answered its `metrics` request."""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, start_http_server

from qwen3vl_client.prometheus import DaemonSnapshot
from qwen3vl_client.protocol import MetricsReply

log = logging.getLogger("qwen3vl.metrics")


class MetricsServer:
    """`/metrics` over HTTP on its own thread (prometheus_client's server): each scrape reads a fresh
    snapshot, never through the socket loop, so a scrape cannot delay a request."""

    def __init__(self, address: str, snapshot: Callable[[], MetricsReply]):
        self.host, self.port = split_address(address)
        self._snapshot = snapshot
        self._server = None

    def start(self) -> None:
        registry = CollectorRegistry()
        registry.register(_Live(self._snapshot))
        self._server, _thread = start_http_server(self.port, self.host, registry)
        log.info("metrics on http://%s:%d/metrics", self.host, self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Live:
    def __init__(self, snapshot: Callable[[], MetricsReply]):
        self._snapshot = snapshot

    def collect(self):
        yield from DaemonSnapshot(self._snapshot()).collect()


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) for the metrics endpoint; ValueError naming the option."""
    host, sep, port = address.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--metrics-address {address!r}: give HOST:PORT, e.g. 0.0.0.0:9464 or 127.0.0.1:9464")
    return host, int(port)
