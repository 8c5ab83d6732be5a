"""A daemon that dies or freezes with requests on it costs a resend, not the request's timeout
(qwen3vl_client/liveness.py; PROTOCOL.md, "When a daemon is lost"): real daemons over tcp and ipc, killed
in a held forward, killed before reading, stopped (SIGSTOP), restarted on the same endpoint.

Assertions say where the answer came from and how many daemons served it; each bound on time is
half the request's timeout, the defect being the whole of it (the seconds are in bench/failover.py)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import zmq

from conftest import Bridge, DaemonProcess, free_port, start_daemon
from qwen3vl_client.client import AsyncClient, Client, DaemonError, DaemonUnavailable
from qwen3vl_client.liveness import Heartbeat
from gates import hold_forwards, open_gate, start_gated

TIMEOUT_S = 60.0
FAST = Heartbeat(interval_s=0.2, timeout_s=1.0)  # a frozen daemon is lost after a second


def endpoint(kind: str, tmp_path: Path, name: str) -> str:
    return f"tcp://127.0.0.1:{free_port()}" if kind == "tcp" else f"ipc://{tmp_path}/{name}/s/d.sock"


def embeds_served(daemon: DaemonProcess) -> int:
    with Client(daemon.endpoint, timeout=30) as own:
        return own.request({"op": "metrics"})["requests"].get("embed", 0)


def queued(daemon: DaemonProcess) -> int:
    with Client(daemon.endpoint, timeout=30) as own:
        return own.health()["queue_depth"]


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)


def kill(daemon: DaemonProcess) -> None:
    daemon.process.send_signal(signal.SIGCONT)  # a stopped process must be able to die
    daemon.process.kill()
    daemon.process.wait(30)


@pytest.fixture(params=["tcp", "ipc"])
def pair(request, tmp_path, tiny_dir):
    """A daemon holding every forward (first in the list: it gets a fresh client's first request)
    and a free one."""
    kind = request.param
    (tmp_path / "held").mkdir()
    held, gate = start_gated(tmp_path / "held", tiny_dir, endpoint(kind, tmp_path, "held"))
    free = start_daemon(tmp_path / "free", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        endpoint=endpoint(kind, tmp_path, "free"))
    try:
        hold_forwards(held, gate)
        yield held, gate, free
    finally:
        open_gate(gate, "forward")
        for d in (held, free):
            kill(d)


def both_connected(client: Client) -> Client:
    """`client` once both daemons answered it: its next request goes to the first, the held one."""
    client.health(), client.health()
    return client


def embed_in_thread(client: Client, outcome: dict) -> threading.Thread:
    def run():
        started = time.monotonic()
        try:
            outcome["result"] = client.embed(["where is my answer"], dimension=4)
        except Exception as exc:  # the test reads it
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def through_the_held_daemon(pair, fault, heartbeat: Heartbeat | None = None, before=lambda: None,
                            queued_first: bool = True) -> dict:
    """One request over both daemons that goes to the held one; `before` runs before it is sent,
    `fault` once it is on the wire (with `queued_first`, once the held daemon has it queued)."""
    held, _, free = pair
    with both_connected(Client([held.endpoint, free.endpoint], timeout=TIMEOUT_S, heartbeat=heartbeat)) as client:
        before()
        outcome: dict = {}
        thread = embed_in_thread(client, outcome)
        if queued_first:
            wait_until(lambda: queued(held) == 1)
        fault()
        thread.join(TIMEOUT_S)
    return outcome


def test_a_daemon_killed_in_a_forward_passes_its_request_to_the_other(pair):
    held, _, free = pair
    outcome = through_the_held_daemon(pair, lambda: kill(held))
    assert "result" in outcome, outcome
    assert outcome["result"].embeddings.shape == (1, 4)
    assert outcome["seconds"] < TIMEOUT_S / 2
    assert embeds_served(free) == 1


def test_a_daemon_killed_before_reading_the_request_passes_it_on(pair):
    held, _, free = pair
    # Stopped first: the request reaches its socket, never the daemon.
    outcome = through_the_held_daemon(pair, lambda: (time.sleep(0.2), kill(held)), queued_first=False,
                                      before=lambda: held.process.send_signal(signal.SIGSTOP))
    assert "result" in outcome and outcome["seconds"] < TIMEOUT_S / 2, outcome
    assert embeds_served(free) == 1


def test_a_frozen_daemon_is_lost_after_the_heartbeat_timeout(pair):
    held, _, free = pair
    outcome = through_the_held_daemon(pair, lambda: held.process.send_signal(signal.SIGSTOP), FAST)
    assert "result" in outcome and outcome["seconds"] < TIMEOUT_S / 2, outcome
    assert embeds_served(free) == 1


def test_a_daemon_busy_far_longer_than_the_heartbeat_timeout_is_not_taken_for_lost(pair):
    held, gate, free = pair

    def busy_then_done():
        time.sleep(5 * FAST.timeout_s)  # libzmq's I/O thread answers the PINGs meanwhile
        open_gate(gate, "forward")

    outcome = through_the_held_daemon(pair, busy_then_done, FAST)
    assert "result" in outcome, outcome
    assert (embeds_served(held), embeds_served(free)) == (1, 0)  # answered where it was sent, once


def test_the_async_client_fails_every_request_of_a_killed_daemon_over(pair):
    held, _, free = pair

    async def scenario():
        async with AsyncClient([held.endpoint, free.endpoint], timeout=TIMEOUT_S) as client:
            for _ in range(2):  # both connected: requests then alternate, and half wait in the held queue
                await client.health()
            tasks = [asyncio.create_task(client.embed([f"text {i}"], dimension=4)) for i in range(8)]
            while await asyncio.to_thread(queued, held) < 4:
                await asyncio.sleep(0.05)
            started = time.monotonic()
            kill(held)
            results = await asyncio.gather(*tasks)
            return results, time.monotonic() - started

    results, seconds = asyncio.run(scenario())
    assert [r.embeddings.shape for r in results] == [(1, 4)] * 8
    assert seconds < TIMEOUT_S / 2
    assert embeds_served(free) == 8  # its own 4, and the 4 the killed daemon held


def lose_a_lone_daemon(daemon: DaemonProcess, timeout: float, then=lambda: None) -> dict:
    """A request to a lone daemon killed before it read it (stopped first); `then` runs after the
    kill (a restart), while the request waits."""
    with Client(daemon.endpoint, timeout=timeout) as client:
        client.health()  # connected
        daemon.process.send_signal(signal.SIGSTOP)
        outcome: dict = {}
        thread = embed_in_thread(client, outcome)
        time.sleep(0.2)
        kill(daemon)
        then()
        thread.join(timeout + 30)
    return outcome


@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_a_lone_daemon_restarted_on_its_endpoint_answers_the_request_it_lost(kind, tmp_path, tiny_dir):
    args = ("--embedding-model", str(tiny_dir), "--reranker-model", "none")
    daemons = [start_daemon(tmp_path / "d", *args, endpoint=endpoint(kind, tmp_path, "d"))]
    try:  # restarted as systemd would
        outcome = lose_a_lone_daemon(daemons[0], TIMEOUT_S, lambda: daemons.append(
            start_daemon(tmp_path / "d", *args, endpoint=daemons[0].endpoint)))
        assert "result" in outcome, outcome
        assert outcome["result"].embeddings.shape == (1, 4)
        assert embeds_served(daemons[-1]) >= 1  # the new process answered it (after refusals while it loaded)
    finally:
        kill(daemons[-1])


def test_a_lost_daemon_that_never_comes_back_is_reported_lost_not_slow(tmp_path, tiny_dir):
    daemon = start_daemon(tmp_path / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    outcome = lose_a_lone_daemon(daemon, 5)
    error = outcome.get("error")
    assert isinstance(error, DaemonUnavailable), outcome
    assert "lost" in str(error) and daemon.endpoint in str(error)


def test_a_payload_over_the_daemons_limit_is_refused_before_sending(tmp_path, tiny_dir):
    daemon = start_daemon(tmp_path / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                          "--max-message-bytes", str(1 << 20))
    huge = "x" * (3 << 20)  # past the limit and the socket's slack: the daemon's socket would drop it

    async def scenario():
        async with AsyncClient(daemon.endpoint, timeout=TIMEOUT_S) as client:
            small = [asyncio.create_task(client.embed([f"small {i}"], dimension=4)) for i in range(4)]
            started = time.monotonic()
            with pytest.raises(DaemonError) as refused:
                await client.embed([huge])
            seconds = time.monotonic() - started
            answered = await asyncio.gather(*small)
            return refused.value, seconds, answered

    try:
        error, seconds, answered = asyncio.run(scenario())
        assert error.code == "too_large" and "max_message_bytes" in str(error) and str(1 << 20) in str(error)
        assert seconds < 5  # no timeout waited: refused by the client
        assert len(answered) == 4  # its neighbours on the shared socket were not disturbed
        with Client(daemon.endpoint, timeout=TIMEOUT_S) as client, pytest.raises(DaemonError) as refused:
            client.embed([huge])
        assert refused.value.code == "too_large"
        assert embeds_served(daemon) == 4  # the huge ones never reached it
    finally:
        kill(daemon)


def test_health_tells_clients_the_daemons_limits(daemon):
    with daemon.client() as client:
        limits = client.health()["limits"]
    assert limits["max_message_bytes"] == 64 * 1024 * 1024 and limits["max_inputs"] == 1024


def test_the_bridge_answers_a_request_whose_daemon_was_killed_from_the_other(pair):
    held, _, free = pair
    bridge = Bridge(f"{held.endpoint},{free.endpoint}")
    try:
        for _ in range(2):  # both connected; the next request goes to the held daemon
            assert httpx.get(f"{bridge.url}/health", timeout=30).status_code == 200
        outcome: dict = {}

        def post():
            outcome["response"] = httpx.post(f"{bridge.url}/embed", json={"texts": ["held"]}, timeout=TIMEOUT_S)

        thread = threading.Thread(target=post)
        thread.start()
        wait_until(lambda: queued(held) == 1)
        kill(held)
        thread.join(TIMEOUT_S)
        assert outcome["response"].status_code == 200, outcome["response"].text
        assert embeds_served(free) == 1
    finally:
        bridge.stop()


def test_the_bridge_answers_503_naming_a_lost_daemon_that_never_came_back(tmp_path, tiny_dir):
    daemon = start_daemon(tmp_path / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    bridge = Bridge(daemon.endpoint, "--timeout", "5")
    try:
        assert httpx.get(f"{bridge.url}/health", timeout=30).status_code == 200
        daemon.process.send_signal(signal.SIGSTOP)
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(
            response=httpx.post(f"{bridge.url}/embed", json={"texts": ["lost"]}, timeout=TIMEOUT_S)))
        thread.start()
        time.sleep(0.3)
        kill(daemon)
        thread.join(TIMEOUT_S)
        response = outcome["response"]
        assert response.status_code == 503 and "lost" in response.text, response.text
    finally:
        bridge.stop()
        kill(daemon)


def test_a_daemon_restarted_with_a_smaller_limit_while_the_client_was_idle_is_asked_again(tmp_path, tiny_dir):
    args = ("--embedding-model", str(tiny_dir), "--reranker-model", "none")
    daemon = start_daemon(tmp_path / "d", *args, "--max-message-bytes", str(3_000_000))
    payload = "x" * 2_500_000
    try:
        with Client(daemon.endpoint, timeout=TIMEOUT_S) as client:
            with pytest.raises(DaemonError) as first:  # under the limit: sent, and the daemon's own answer
                client.embed([payload])
            assert "max_text_chars" in str(first.value)
            daemon.stop()
            daemon = start_daemon(tmp_path / "d", *args, "--max-message-bytes", str(1_100_000))
            started = time.monotonic()
            with pytest.raises(DaemonError) as refused:
                client.embed([payload])
            assert refused.value.code == "too_large" and "1100000" in str(refused.value)
            assert time.monotonic() - started < 5  # refused before sending, not lost and resent
    finally:
        kill(daemon)


@pytest.mark.parametrize("interval, timeout", [(1.0, 1.0), (0.5, 0.9), (0.05, 1.0), (True, 3), ("1", "3"),
                                               (1.0, float("nan")), (1.0, float("inf"))])
def test_heartbeats_that_would_take_a_healthy_daemon_for_lost_are_refused(interval, timeout):
    with pytest.raises(ValueError, match="heartbeat"):
        Heartbeat(interval, timeout)


def test_the_daemon_is_told_to_wait_past_the_clients_next_ping():
    beat = Heartbeat(0.2, 0.4)
    assert beat.ttl_s > beat.timeout_s + beat.interval_s - 1e-9


def test_a_heartbeat_of_another_type_and_a_timeout_that_is_no_time_are_refused_at_once(daemon):
    with pytest.raises(TypeError, match="Heartbeat"):
        Client(daemon.endpoint, heartbeat=(1, 3))
    with pytest.raises(TypeError, match="Heartbeat"):
        AsyncClient(daemon.endpoint, heartbeat={"interval_s": 1})
    with daemon.client() as client:
        for bad in (0, -1, float("nan"), True):
            with pytest.raises(ValueError, match="timeout"):
                client.health(timeout=bad)
        assert client.health(timeout=float("inf"))["status"] == "ready"


def silent_daemon() -> tuple[zmq.Context, zmq.Socket, str]:
    """A ROUTER that takes requests and never answers (a real socket; no daemon behind it)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    return ctx, router, f"tcp://127.0.0.1:{port}"


def test_closing_an_async_client_fails_its_waiting_requests_at_once():
    ctx, router, where = silent_daemon()

    async def scenario():
        client = AsyncClient(where, timeout=TIMEOUT_S)
        waiting = [asyncio.create_task(client.health()) for _ in range(5)]
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await client.close()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        return outcomes, time.monotonic() - started

    try:
        outcomes, seconds = asyncio.run(scenario())
        assert all(isinstance(o, DaemonUnavailable) and "closed" in str(o) for o in outcomes), outcomes
        assert seconds < 5
    finally:
        ctx.destroy(linger=0)


def test_the_time_a_request_waits_for_the_clients_other_threads_counts_against_its_timeout():
    ctx, router, where = silent_daemon()
    ended: list[float] = []
    try:
        with Client(where, timeout=1.0) as client:
            started = time.monotonic()

            def ask():
                with pytest.raises(Exception):
                    client.health()
                ended.append(time.monotonic() - started)

            threads = [threading.Thread(target=ask) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        assert len(ended) == 8 and max(ended) < 4.0, ended  # each within ~1 s; one after another: 8 s
    finally:
        ctx.destroy(linger=0)
