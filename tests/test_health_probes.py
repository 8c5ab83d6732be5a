"""The probes a Kubernetes pod runs (`health --live`, `health --ready`) and the daemon's own Prometheus
`/metrics` (`--metrics-address`): what each says while loading, ready, busy and draining."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import free_port, wait_ready
from bench.harness import GATED
from gates import hold_forwards, open_gate, start_gated
from qwen3vl_client.client import AsyncClient, Client, DaemonError


def probe(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", "health", *args, "--endpoint", endpoint],
                          capture_output=True, text=True, timeout=30)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


@pytest.fixture
def gated(tmp_path, tiny_dir):
    port = free_port()
    daemon, gate = start_gated(tmp_path, tiny_dir, f"ipc://{tmp_path}/s/d.sock", "--metrics-address",
                               f"127.0.0.1:{port}")
    try:
        yield daemon, gate, port
    finally:
        open_gate(gate, "load")
        open_gate(gate, "forward")
        daemon.process.kill()
        daemon.process.wait(30)


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.1)


def test_while_loading_the_daemon_is_live_not_ready_and_metrics_say_so(gated):
    daemon, gate, port = gated
    wait_for(lambda: probe(daemon.endpoint, "--live").returncode == 0)
    ready = probe(daemon.endpoint, "--ready")
    assert ready.returncode == 1 and ready.stdout.startswith("loading"), ready
    assert "qwen3vl_daemon_ready 0.0" in scrape(port)
    open_gate(gate, "load")
    open_gate(gate, "forward")
    wait_ready(daemon)
    ready = probe(daemon.endpoint, "--ready")
    assert ready.returncode == 0 and ready.stdout.startswith("ready ("), ready
    metrics = scrape(port)
    assert "qwen3vl_daemon_ready 1.0" in metrics and "qwen3vl_daemon_queue_depth 0.0" in metrics
    assert 'qwen3vl_daemon_model_ready{model="embedding:' in metrics and metrics.count("model_ready{") == 1


def test_a_busy_daemon_is_live_and_ready_and_its_queue_depth_shows_the_work(gated):
    daemon, gate, port = gated
    hold_forwards(daemon, gate)
    with Client(daemon.endpoint, timeout=60) as client:
        worker = threading.Thread(target=client.embed, args=([f"held {i}" for i in range(5)],))
        worker.start()
        wait_for(lambda: "qwen3vl_daemon_queue_depth 5.0" in scrape(port))
        started = time.monotonic()
        live, ready = probe(daemon.endpoint, "--live"), probe(daemon.endpoint, "--ready")
        assert time.monotonic() - started < 10
        assert live.returncode == 0 and ready.returncode == 0, (live, ready)
        open_gate(gate, "forward")
        worker.join(30)


def test_while_draining_the_daemon_is_live_but_not_ready(gated):
    daemon, gate, port = gated
    hold_forwards(daemon, gate)
    outcome = {}

    def hold():
        async def main():
            async with AsyncClient(daemon.endpoint, timeout=60) as client:
                outcome["reply"] = await client.embed(["accepted before the signal"])
        asyncio.run(main())

    worker = threading.Thread(target=hold)
    worker.start()
    wait_for(lambda: "qwen3vl_daemon_queue_depth 1.0" in scrape(port))
    daemon.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining" in probe(daemon.endpoint, "--ready").stdout)
    ready, live = probe(daemon.endpoint, "--ready"), probe(daemon.endpoint, "--live")
    assert ready.returncode == 1 and live.returncode == 0, (ready, live)
    assert "qwen3vl_daemon_ready 0.0" in scrape(port)
    open_gate(gate, "forward")
    worker.join(30)
    assert outcome["reply"].embeddings.shape[0] == 1  # the accepted request was answered
    assert daemon.process.wait(30) == 0


def test_with_no_daemon_both_probes_fail_within_their_second(tmp_path):
    for flag in ("--live", "--ready"):
        started = time.monotonic()
        result = probe(f"ipc://{tmp_path}/nobody.sock", flag)
        assert result.returncode == 1 and "no daemon" in result.stderr, result
        assert time.monotonic() - started < 20  # the interpreter's start plus the probe's own 1 s (not 60 s)


def test_a_bad_metrics_address_is_refused_naming_the_option(tiny_dir):
    result = subprocess.run([sys.executable, "-m", "daemon", "serve", "--metrics-address", "nine-four-six-four",
                             "--embedding-model", str(tiny_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--metrics-address" in result.stderr and "HOST:PORT" in result.stderr


def test_at_the_drain_timeout_every_accepted_request_over_tcp_gets_its_answer(tmp_path, tiny_dir):
    """A pod's SIGTERM with forwards that outlast the drain: each accepted request is answered
    `shutting_down` (so its client retries on another pod), none is left to time out."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon, gate = start_gated(tmp_path, tiny_dir, endpoint, "--drain-timeout", "1", "--max-batch-size", "1")
    process = daemon.process
    try:
        hold_forwards(daemon, gate)

        async def main():
            async with AsyncClient(endpoint, timeout=30) as client:
                async def one(i):
                    try:
                        await client.embed([f"request {i} " * 50] * 4)
                        return "ok"
                    except Exception as exc:
                        return type(exc).__name__ + ": " + str(exc).split(":")[0]
                calls = [asyncio.ensure_future(one(i)) for i in range(120)]
                await asyncio.sleep(1.0)  # all admitted (or refused overloaded), the first forward held
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls)

        outcomes = asyncio.run(main())
        open_gate(gate, "forward")  # the forward in progress ends; then the process exits
        assert process.wait(30) == 0
    finally:
        open_gate(gate, "forward")
        process.kill()
    lost = [o for o in outcomes if o.startswith("DaemonTimeout")]
    assert not lost and all(o.startswith(("DaemonError: shutting_down", "DaemonError: overloaded")) for o in outcomes), \
        sorted(set(outcomes))


def test_requests_that_come_while_the_socket_waits_to_close_are_refused_not_left_unread(tmp_path, tiny_dir):
    """After the drain timeout the socket stays open a moment for the last replies to go out; a
    request that comes then gets `shutting_down` (its client retries elsewhere), never silence."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    long_grace = GATED.replace("from daemon.main import main", "import daemon.serving.server\n"
                               "daemon.serving.server.CLOSE_GRACE_S = 8.0  # room for the test's requests\n"
                               "from daemon.main import main")
    daemon, gate = start_gated(tmp_path, tiny_dir, endpoint, "--drain-timeout", "0.5", script=long_grace)
    process, log = daemon.process, daemon.log
    try:
        hold_forwards(daemon, gate)

        async def main():
            async with AsyncClient(endpoint, timeout=20) as client:
                held = asyncio.ensure_future(client.embed(["held past the drain timeout"]))
                await asyncio.sleep(0.5)
                process.send_signal(signal.SIGTERM)
                while "drain timeout" not in log.read_text():
                    await asyncio.sleep(0.05)
                late = await asyncio.gather(*(client.embed([f"late {i}"]) for i in range(10)),
                                            return_exceptions=True)
                return [held.exception() or held.result()] if held.done() else ["not answered"], late

        held, late = asyncio.run(main())
        open_gate(gate, "forward")
        assert process.wait(30) == 0
    finally:
        open_gate(gate, "forward")
        process.kill()
    assert all(isinstance(o, DaemonError) and o.code == "shutting_down" for o in [*held, *late]), (held, late)
