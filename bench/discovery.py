"""Daemons found by DNS (`dns+tcp://`): what following a name costs per request, how long a request
waits when a daemon dies, how soon a new one gets work, and what a busy Prometheus scrape of a
daemon's own /metrics costs its requests. One run, one machine, daemons on 127.0.0.x.

    .venv/bin/python -m bench.discovery [--requests 300] [--refresh 2]

Each row is measured in the same run as what it is compared with:
- per request: one-text embeds, alternating a client given the three tcp:// endpoints and one given
  `dns+tcp://pods:PORT` (an injected resolver naming the same three), p50 and p90 of each;
- failover: one daemon killed (SIGKILL, still in DNS), then requests back to back from a new client
  (which does not yet know which daemon is dead) and from one that had been serving: the slowest,
  and how many took over 100 ms, with the default 1 s connect timeout;
- join: a fourth daemon added to the name; from the resolver's change to the first request it
  answered, with requests every 50 ms and the given refresh interval;
- scrape: one-text p50 while a thread fetches the daemon's /metrics 10 times a second (a busy
  scraper: Prometheus asks every 15 s or so), then back to back, against none.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.harness import ROOT, Servers, free_port, wait_daemon_ready
from qwen3vl_client.client import Client
from daemon.loading.tiny import BENCH_SPEC, build_tiny_checkpoint


class Names:
    def __init__(self, addresses: list[str]):
        self.addresses = list(addresses)
        self.changed_at = 0.0

    def set(self, addresses: list[str]) -> None:
        self.addresses, self.changed_at = list(addresses), time.monotonic()

    def __call__(self, host: str, port: int) -> list[str]:
        return list(self.addresses)


def start(servers: Servers, work: Path, ckpt: Path, host: str, port: int, metrics_port: int | None = None) -> str:
    endpoint = f"tcp://{host}:{port}"
    extra = ["--metrics-address", f"127.0.0.1:{metrics_port}"] if metrics_port else []
    proc = servers.spawn([sys.executable, "-m", "daemon", "serve", "--endpoint", endpoint, "--embedding-model",
                          str(ckpt), "--reranker-model", "none", "--log-level", "warning", *extra],
                         name=host, log=work / f"{host}.log", cwd=ROOT)
    wait_daemon_ready(endpoint, proc)
    return endpoint


def timed(client: Client, text: str) -> float:
    began = time.perf_counter()
    client.embed([text], dimension=8)
    return time.perf_counter() - began


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000)


def per_request(static: Client, named: Client, requests: int) -> None:
    for i in range(20):  # warm both
        timed(static, f"warm {i}")
        timed(named, f"warm {i}")
    plain, dns = [], []
    for i in range(requests):
        plain.append(timed(static, f"query {i}"))
        dns.append(timed(named, f"query {i}"))
    print(f"per request: tcp list p50 {ms(plain, 50):.2f} ms p90 {ms(plain, 90):.2f} | dns+tcp p50 "
          f"{ms(dns, 50):.2f} ms p90 {ms(dns, 90):.2f} | ratio p50 {ms(dns, 50) / ms(plain, 50):.3f}")


def failover(servers: Servers, port: int, names: Names, refresh: float, serving: Client) -> None:
    servers.by_name["127.0.0.2"].send_signal(signal.SIGKILL)
    servers.by_name["127.0.0.2"].wait(30)
    time.sleep(0.3)
    with Client(f"dns+tcp://pods:{port}", timeout=30, resolver=names, dns_refresh_s=refresh) as fresh:
        for label, client in (("a new client", fresh), ("a client that was serving", serving)):
            times = [timed(client, f"after the kill {i}") for i in range(12)]
            print(f"failover ({label}, one of three dead, connect timeout 1 s): slowest {max(times) * 1000:.0f} ms, "
                  f"{sum(t > 0.1 for t in times)} of {len(times)} over 100 ms, p50 {ms(times, 50):.2f} ms")


def join(servers: Servers, work: Path, ckpt: Path, port: int, names: Names, refresh: float) -> None:
    with Client(f"dns+tcp://pods:{port}", timeout=30, resolver=names, dns_refresh_s=refresh) as client:
        client.embed(["before"], dimension=8)
        newcomer = start(servers, work, ckpt, "127.0.0.5", port)
        with Client(newcomer, timeout=10) as own:
            served = lambda: own.request({"op": "metrics"})["requests"].get("embed", 0)  # noqa: E731
            names.set(["127.0.0.3", "127.0.0.4", "127.0.0.5"])
            while served() == 0:
                client.embed(["joining"], dimension=8)
                time.sleep(0.05)
            print(f"join: a new address answered its first request {time.monotonic() - names.changed_at:.2f} s "
                  f"after it appeared in DNS (refresh every {refresh:g} s)")


def scrape(endpoint: str, metrics_port: int, requests: int) -> None:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with Client(endpoint, timeout=30) as client:
        for i in range(20):
            timed(client, f"warm {i}")
        quiet = [timed(client, f"quiet {i}") for i in range(requests)]
        for label, pause in (("10 scrapes/s", 0.1), ("back to back", 0.0)):
            stop, took = threading.Event(), []

            def scraper() -> None:
                while not stop.is_set():
                    began = time.perf_counter()
                    with urllib.request.urlopen(url, timeout=5) as r:
                        r.read()
                    took.append(time.perf_counter() - began)
                    stop.wait(pause)

            thread = threading.Thread(target=scraper)
            thread.start()
            began = time.monotonic()
            busy = [timed(client, f"scraped {i}") for i in range(requests)]
            seconds = time.monotonic() - began
            stop.set()
            thread.join()
            print(f"scrape ({label}: {len(took) / seconds:.0f}/s, each p50 {ms(took, 50):.1f} ms): one-text p50 "
                  f"{ms(busy, 50):.2f} ms against {ms(quiet, 50):.2f} ms with none, ratio {ms(busy, 50) / ms(quiet, 50):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--refresh", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        ckpt = build_tiny_checkpoint(work / "ckpt", BENCH_SPEC)
        port, metrics_port = free_port(), free_port()
        hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        endpoints = [start(servers, work, ckpt, h, port, metrics_port if h == "127.0.0.4" else None) for h in hosts]
        names = Names(hosts)
        with Client(endpoints, timeout=30) as static, \
                Client(f"dns+tcp://pods:{port}", timeout=30, resolver=names, dns_refresh_s=args.refresh) as named:
            per_request(static, named, args.requests)
            scrape(endpoints[2], metrics_port, args.requests)
            failover(servers, port, names, args.refresh, named)
        names.set(["127.0.0.3", "127.0.0.4"])
        join(servers, work, ckpt, port, names, args.refresh)


if __name__ == "__main__":
    main()
