"""Fault scenarios shared by the test suite (one short run, judged by asserts) and the reliability
benchmarks (repeated, with figures): kill -9 of a daemon under steady IPC and HTTP load."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from qwen3vl_client.client import Client

TEXT = "steady load"
# How a call may end while its daemon is killed and restarted: no daemon (or its reply lost with
# it), not loaded yet (it binds before loading), the bridge saying so.
CLEAR_ERRORS = frozenset({"DaemonTimeout:", "DaemonUnavailable:", "DaemonError:not_loaded", "http 503", "http 504"})


def steady_load(stop: threading.Event, call: Callable[[], Any], out: list) -> None:
    """Call `call` until stopped, recording (when it started, how long it took, its outcome)."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            outcome = call()
        except Exception as exc:  # recorded, judged by the caller
            outcome = f"{type(exc).__name__}:{getattr(exc, 'code', '')}"
        out.append((started, time.monotonic() - started, outcome))


def ipc_embed_call(client: Client, want: np.ndarray) -> Callable[[], str]:
    def call() -> str:
        return "ok" if np.abs(client.embed([TEXT]).embeddings - want).max() < 1e-5 else "WRONG RESULT"
    return call


def http_embed_call(http: httpx.Client, want: np.ndarray) -> Callable[[], str]:
    def call() -> str:
        r = http.post("/embed", json={"texts": [TEXT]})
        if r.status_code != 200:
            return f"http {r.status_code}"
        return "ok" if np.abs(np.asarray(r.json()["embeddings"]) - want).max() < 1e-5 else "WRONG RESULT"
    return call


@dataclass
class KillRun:
    outcomes: dict[tuple[str, int], list[tuple[float, float, Any]]]  # per client: (started, took, outcome)
    killed: float  # monotonic time of the kill
    restarted: float  # when the new daemon was ready
    stale_socket: bool  # the dead daemon's socket file was still there
    hung_threads: int

    @property
    def calls(self) -> list[tuple[str, float, float, Any]]:
        """Every call: (ipc|http, started, took, outcome)."""
        return [(kind, *o) for (kind, _), out in self.outcomes.items() for o in out]


def kill_9_under_load(endpoint: str, url: str, want: np.ndarray, kill: Callable[[], None],
                      restart: Callable[[], None], ipc_clients: int = 4, http_clients: int = 2,
                      ipc_timeout_s: float = 3.0, before_s: float = 1.5, down_s: float = 2.0,
                      after_s: float = 3.0) -> KillRun:
    """Steady load from IPC and HTTP clients; `kill()` the daemon (and wait for it) `before_s` in,
    leave it down `down_s`, `restart()` it on the same socket, and keep the load on `after_s` more."""
    stop = threading.Event()
    ipcs = [Client(endpoint, timeout=ipc_timeout_s, connect_timeout=0.5) for _ in range(ipc_clients)]
    https = [httpx.Client(base_url=url, timeout=30) for _ in range(http_clients)]
    outs = {("ipc", i): [] for i in range(ipc_clients)} | {("http", i): [] for i in range(http_clients)}
    calls = [(("ipc", i), ipc_embed_call(c, want)) for i, c in enumerate(ipcs)]
    calls += [(("http", i), http_embed_call(h, want)) for i, h in enumerate(https)]
    threads = [threading.Thread(target=steady_load, args=(stop, call, outs[key])) for key, call in calls]
    try:
        for t in threads:
            t.start()
        time.sleep(before_s)
        kill()
        killed = time.monotonic()
        time.sleep(down_s)
        stale = Path(endpoint[len("ipc://"):]).exists()
        restart()
        restarted = time.monotonic()
        time.sleep(after_s)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        for c in ipcs:
            c.close()
        for h in https:
            h.close()
    return KillRun(outs, killed, restarted, stale, sum(t.is_alive() for t in threads))
