"""Faults under load, repeated, with figures: kill -9 of the daemon, then SIGTERM.

    .venv/bin/python -m bench.faults [--kills 5] [--terms 3] [--clients 8]

kill -9: a daemon and its bridge under steady load (`--clients` IPC clients with a 3 s timeout and
2 HTTP clients); the daemon is killed, left down 2 s, restarted on the same socket (its stale socket
file replaced). Per cycle: how every call ended, the longest call, and how long after the restart
the first IPC and the first HTTP success came. Every success is checked against the reference vector.

SIGTERM: `--clients` DEALER sockets each put 6 embeds in flight, then a health request; its reply
(answered at once) proves the 6 were read. Then SIGTERM, and 2 more requests per socket. Per run:
accepted, answered ok, how the late requests ended (`shutting_down`; `ok` if read before the signal
was; no reply if the daemon had exited), the time from SIGTERM to exit, the exit status. Exits 1 if any rule of RELIABILITY.md is broken.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from bench.harness import Servers
from bench.scenarios import CLEAR_ERRORS, TEXT, kill_9_under_load
from qwen3vl_client.client import Client
from daemon.loading.tiny import build_tiny_checkpoint

def kill_cycle(servers: Servers, work: Path, ckpt: Path, endpoint: str, url: str, want: np.ndarray,
               clients: int) -> dict:
    def kill() -> None:
        servers.by_name["daemon"].kill()
        servers.by_name["daemon"].wait(10)

    run = kill_9_under_load(endpoint, url, want, kill,
                            lambda: servers.daemon(work, "daemon", ckpt, "--reranker-model", "none"),
                            ipc_clients=clients, before_s=2.0, after_s=4.0)
    calls = run.calls
    first_ok = {kind: min((s + took - run.restarted for k, s, took, o in calls if k == kind and o == "ok"
                           and s + took > run.restarted), default=float("inf")) for kind in ("ipc", "http")}
    return {
        "calls": len(calls),
        "outcomes": collections.Counter(o for *_, o in calls),
        "in flight at the kill": sum(1 for _, s, took, _ in calls if s < run.killed < s + took),
        "longest call s": max(took for _, _, took, _ in calls),
        "stale socket left": run.stale_socket,
        "kill to ready again s": run.restarted - run.killed,  # 2 s down on purpose, then start and load
        "first ok after restart s": first_ok,
        "hung threads": run.hung_threads,
    }


def term_run(servers: Servers, work: Path, ckpt: Path, clients: int) -> dict:
    endpoint = servers.daemon(work, "term", ckpt, "--reranker-model", "none")
    proc = servers.by_name["term"]
    ctx = zmq.Context.instance()
    socks = [ctx.socket(zmq.DEALER) for _ in range(clients)]
    for k, sock in enumerate(socks):
        sock.linger = 0
        sock.connect(endpoint)
        for i in range(6):
            texts = [f"client {k} request {i} text {j} " + "word " * 150 for j in range(8)]
            sock.send_multipart([b"", msgpack.packb({"op": "embed", "id": i, "inputs": texts})])
        sock.send_multipart([b"", msgpack.packb({"op": "health", "id": "barrier"})])
    replies: dict[int, list] = {k: [] for k in range(clients)}
    for k, sock in enumerate(socks):
        while (r := msgpack.unpackb(sock.recv_multipart()[-1]))["id"] != "barrier":
            replies[k].append(r)
    proc.send_signal(signal.SIGTERM)
    termed = time.monotonic()
    for sock in socks:
        for i in range(2):
            sock.send_multipart([b"", msgpack.packb({"op": "embed", "id": f"late{i}", "inputs": ["late"]})])
    code = proc.wait(60)
    drained = time.monotonic() - termed
    for k, sock in enumerate(socks):  # every reply the daemon sent before exiting is queued here by now
        while sock.poll(200):
            replies[k].append(msgpack.unpackb(sock.recv_multipart()[-1]))
        sock.close()
    flat = [r for rs in replies.values() for r in rs]
    accepted = [r for r in flat if isinstance(r["id"], int)]
    late = collections.Counter("ok" if r["ok"] else r["error"]["code"] for r in flat if not isinstance(r["id"], int))
    return {"accepted": clients * 6, "answered ok": sum(1 for r in accepted if r["ok"] and r["count"] == 8),
            "answered twice": len(accepted) - len({(k, r["id"]) for k, rs in replies.items() for r in rs
                                                   if isinstance(r["id"], int)}),
            "late sent": clients * 2, "late replies": dict(late), "exit status": code, "SIGTERM to exit s": drained}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--terms", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    broken = []
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        ckpt = build_tiny_checkpoint(work / "tiny")
        endpoint = servers.daemon(work, "daemon", ckpt, "--reranker-model", "none")
        url = servers.bridge(work, "bridge", endpoint, "--timeout", "5")
        with Client(endpoint) as c:
            want = c.embed([TEXT]).embeddings
        for n in range(args.kills):
            r = kill_cycle(servers, work, ckpt, endpoint, url, want, args.clients)
            print(f"kill -9 #{n + 1}: {r}", flush=True)
            unclear = set(r["outcomes"]) - CLEAR_ERRORS - {"ok"}
            if unclear or r["hung threads"] or r["longest call s"] > 10 or max(r["first ok after restart s"].values()) > 5:
                broken.append(f"kill #{n + 1}: {r}")
        for n in range(args.terms):
            r = term_run(servers, work, ckpt, args.clients)
            print(f"SIGTERM #{n + 1}: {r}", flush=True)
            late_unexpected = set(r["late replies"]) - {"ok", "shutting_down"}  # ok: read before the signal
            if r["answered ok"] != r["accepted"] or r["answered twice"] or late_unexpected or r["exit status"] != 0:
                broken.append(f"SIGTERM #{n + 1}: {r}")
    print(f"rules broken: {len(broken)}")
    for b in broken:
        print(f"  {b}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
