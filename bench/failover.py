"""Failover: the seconds from a daemon's fault to the answer of the request it held.

    .venv/bin/python -m bench.failover [--timeout 20] [--transport tcp|ipc]

Two daemons on the tiny checkpoint, a blocking Client over both; the first daemon holds its forwards
(bench.harness.GATED), so the request sent to it waits there. Then the fault, and the clock runs
until the request is answered (by the other daemon) or fails:
  - killed: SIGKILL while the forward is held (the connection closes);
  - frozen: SIGSTOP while the forward is held (the connection stays open: only heartbeats tell);
  - restarted: one daemon alone, SIGSTOP then SIGKILL before it read the request, started again on
    the same endpoint (as systemd would); the answer comes from the new process.
Run it from another tree (PYTHONPATH=OLD_TREE) for the figures of the client before failover.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import GATED, free_port, wait_daemon_ready
from qwen3vl_client.client import Client
from daemon.loading.tiny import build_tiny_checkpoint

HEARTBEAT_S = (1.0, 3.0)  # the clients' default interval and timeout, named for the old tree too


def start(ckpt: Path, endpoint: str, gate: Path | None, log: Path) -> subprocess.Popen:
    code = ["-c", GATED] if gate is not None else ["-m", "daemon"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QWEN3VL_DTYPE": "float32", "GATE": str(gate)}
    if gate is not None:
        for name in ("load", "forward"):
            Path(f"{gate}.{name}").touch()
    process = subprocess.Popen([sys.executable, *code, "serve", "--endpoint", endpoint, "--embedding-model", str(ckpt),
                                "--reranker-model", "none", "--log-level", "warning"],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    wait_daemon_ready(endpoint, process)
    if gate is not None:
        Path(f"{gate}.forward").unlink()  # every forward from now on is held
    return process


def client(endpoints: list[str], timeout: float) -> Client:
    made = Client(endpoints, timeout=timeout)
    for _ in endpoints:  # connected to each; the next request goes to the first
        made.health()
    return made


def timed_request(c: Client, fault) -> tuple[float, str]:
    """Send one embed, run `fault` once it is on the wire, and return (seconds from the fault to the
    end, how it ended)."""
    outcome: dict = {}

    def call():
        try:
            c.embed(["where is my answer"], dimension=4)
            outcome["end"] = "answered"
        except Exception as exc:
            outcome["end"] = f"{type(exc).__name__}"
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=call)
    thread.start()
    faulted = fault()
    thread.join()
    return outcome["at"] - faulted, outcome["end"]


def queued(endpoint: str) -> int:
    with Client(endpoint, timeout=10) as own:
        return own.health()["queue_depth"]


def held_fault(proc: subprocess.Popen, endpoint: str, sig: int):
    def fault() -> float:
        while queued(endpoint) < 1:
            time.sleep(0.01)
        proc.send_signal(sig)
        return time.monotonic()

    return fault


def run(ckpt: Path, work: Path, transport: str, timeout: float) -> list[tuple[str, float, str]]:
    def endpoint(name: str) -> str:
        return f"tcp://127.0.0.1:{free_port()}" if transport == "tcp" else f"ipc://{work}/{name}.sock"

    rows = []
    for name, sig in (("killed", signal.SIGKILL), ("frozen", signal.SIGSTOP)):
        held_at, free_at = endpoint(f"{name}-held"), endpoint(f"{name}-free")
        held = start(ckpt, held_at, work / f"{name}-gate", work / f"{name}-held.log")
        free = start(ckpt, free_at, None, work / f"{name}-free.log")
        try:
            with client([held_at, free_at], timeout) as c:
                rows.append((name, *timed_request(c, held_fault(held, held_at, sig))))
        finally:
            for p in (held, free):
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    lone_at = endpoint("lone")
    lone = [start(ckpt, lone_at, None, work / "lone.log")]

    def restart() -> float:
        lone[0].send_signal(signal.SIGSTOP)
        time.sleep(0.2)  # the request is in its socket, unread
        lone[0].kill()
        lone[0].wait()
        faulted = time.monotonic()
        lone[0] = start(ckpt, lone_at, None, work / "lone-again.log")
        return faulted

    try:
        with client([lone_at], timeout) as c:
            rows.append(("restarted", *timed_request(c, restart)))
    finally:
        lone[0].kill()
        lone[0].wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=20.0, help="the client's timeout (s)")
    parser.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = build_tiny_checkpoint(work / "ckpt")
        heartbeat = "heartbeat" in inspect.signature(Client).parameters
        print(f"client: {Path(inspect.getfile(Client)).parent.parent} (heartbeats: "
              f"{'%g s, lost after %g s' % HEARTBEAT_S if heartbeat else 'none'}); timeout {args.timeout:g} s; "
              f"{args.transport}")
        print(f"{'fault':<10} {'fault to end (s)':>17}  ended")
        for name, seconds, end in run(ckpt, work, args.transport, args.timeout):
            print(f"{name:<10} {seconds:>17.2f}  {end}")


if __name__ == "__main__":
    main()
