"""Several daemons behind one client, and tcp:// endpoints with CURVE."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port, start_daemon
from qwen3vl_client.client import Client, CurveKeys, DaemonTimeout, DaemonUnavailable


def test_two_daemons_share_the_load_and_survive_a_kill_and_restart(tmp_path, tiny_dir):
    args = ("--embedding-model", str(tiny_dir), "--reranker-model", "none")
    a, b = start_daemon(tmp_path / "a", *args), start_daemon(tmp_path / "b", *args)
    outcomes = {"ok": 0, "clear_error": 0}
    try:
        with Client([a.endpoint, b.endpoint], timeout=10, connect_timeout=0.5) as c:
            for i in range(120):
                if i == 30:
                    a.process.send_signal(signal.SIGKILL)
                    a.process.wait(10)
                if i == 60:
                    a = start_daemon(tmp_path / "a", *args)
                try:
                    result = c.embed([f"request {i}"], dimension=4)
                    assert result.embeddings.shape == (1, 4)
                    outcomes["ok"] += 1
                except (DaemonTimeout, DaemonUnavailable):
                    outcomes["clear_error"] += 1
        served = []
        for d in (a, b):
            with d.client() as own:
                served.append(own.request({"op": "metrics"})["requests"].get("embed", 0))
    finally:
        a.stop()
        b.stop()
    assert outcomes["ok"] + outcomes["clear_error"] == 120  # nothing lost silently, nothing hung
    assert outcomes["ok"] >= 110  # failover: a request whose daemon died went to the other one
    assert all(n > 0 for n in served)  # the restarted daemon took work again: the load is spread


def test_curve_serves_authorized_clients_only(tmp_path, tiny_dir):
    keys = tmp_path / "keys"
    for name in ("server", "client", "stranger"):
        subprocess.run([sys.executable, "-m", "daemon", "keygen", str(keys), "--name", name], check=True,
                       capture_output=True, timeout=60)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes((keys / "client.key").read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    d = start_daemon(tmp_path / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                     "--curve-secret-key", str(keys / "server.key_secret"), "--curve-authorized-keys", str(authorized),
                     endpoint=endpoint, wait=False)
    try:
        good = CurveKeys.from_files(str(keys / "server.key"), str(keys / "client.key_secret"))
        deadline = time.monotonic() + 120
        with Client(endpoint, timeout=2, curve=good) as c:
            while True:
                try:
                    if c.health()["status"] == "ready":
                        break
                except (DaemonTimeout, DaemonUnavailable):
                    assert time.monotonic() < deadline and d.process.poll() is None
                    time.sleep(0.2)
            assert c.embed(["over curve"]).embeddings.shape == (1, 64)
        bad = CurveKeys.from_files(str(keys / "server.key"), str(keys / "stranger.key_secret"))
        for curve in (bad, None):
            with Client(endpoint, timeout=1.5, connect_timeout=0.5, curve=curve) as c:
                with pytest.raises((DaemonTimeout, DaemonUnavailable)):
                    c.health()
    finally:
        d.stop()


def test_tcp_reachable_from_other_hosts_needs_curve(tiny_dir):
    result = subprocess.run([sys.executable, "-m", "daemon", "serve", "--endpoint", f"tcp://0.0.0.0:{free_port()}",
                             "--embedding-model", str(tiny_dir), "--reranker-model", "none"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--curve-secret-key" in result.stderr
