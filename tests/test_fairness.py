"""One client's large request cannot own the daemon: fair interleaving across requests, and
deadlines that drop work nobody waits for any more."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import exchange, start_daemon
from qwen3vl_client.client import DaemonError, DaemonTimeout

INGEST = ["word " * 300] * 1024  # ~1.7M estimated tokens: within the 4M bound, seconds of work here


@pytest.fixture(scope="module")
def fair(tmp_path_factory, tiny_dir):
    proc = start_daemon(tmp_path_factory.mktemp("fair"), "--embedding-model", str(tiny_dir), "--reranker-model",
                        str(tiny_dir), "--max-batch-size", "8")
    yield proc
    proc.stop()


def _idle(proc, within_s: float) -> bool:
    end = time.monotonic() + within_s
    with proc.client() as c:
        while time.monotonic() < end:
            if c.health()["queue_depth"] == 0:
                return True
            time.sleep(0.05)
    return False


def _ingest_in_background(proc, payload: dict) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        start = time.monotonic()
        with proc.client(timeout=300) as c:
            out["reply"] = c.request(payload)
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.mark.parametrize("small", [["one short query"], ["five inputs, not tokenized inline"] * 5],
                         ids=["one-text", "five-inputs"])
def test_a_small_request_is_served_while_another_clients_large_ingest_runs(fair, small):
    thread, ingest = _ingest_in_background(fair, {"op": "embed", "inputs": INGEST})
    time.sleep(0.5)
    with fair.client(timeout=300) as c:
        start = time.monotonic()
        result = c.embed(small)
        latency = time.monotonic() - start
    ingest_running = thread.is_alive()
    thread.join()
    assert result.embeddings.shape[0] == len(small)
    assert ingest["reply"]["ok"] and ingest["reply"]["count"] == len(INGEST)
    assert ingest_running, "the ingest ended first: the small request waited behind all of it"
    assert latency < ingest["seconds"] / 5, (latency, ingest["seconds"])


def test_two_large_requests_progress_together(fair):
    half = {"op": "embed", "inputs": INGEST[:256]}
    first, a = _ingest_in_background(fair, half)
    time.sleep(0.2)
    second, b = _ingest_in_background(fair, half)
    first.join()
    second.join()
    assert a["reply"]["ok"] and b["reply"]["ok"]
    # Interleaved, the second ends about when the first does, not a whole request's time later.
    assert b["seconds"] < 1.5 * a["seconds"], (a["seconds"], b["seconds"])


@pytest.mark.parametrize("value", [0, -5, True, "100", 1e12, [100]])
def test_bad_deadline_values_are_invalid_naming_the_field(fair, value):
    with fair.client() as c:
        reply = c.request({"op": "embed", "inputs": ["x"], "deadline_ms": value})
    assert reply["error"]["code"] == "invalid_request" and "deadline_ms" in reply["error"]["message"]


@pytest.mark.parametrize("op", ["embed", "rerank"])
def test_work_not_done_by_the_deadline_is_dropped_and_answered_deadline_exceeded(fair, op):
    payload = ({"op": "embed", "inputs": INGEST} if op == "embed"
               else {"op": "rerank", "query": "q", "documents": INGEST[:512]})
    start = time.monotonic()
    [reply] = exchange(fair.endpoint, [{**payload, "deadline_ms": 400}])
    elapsed = time.monotonic() - start
    assert reply["error"]["code"] == "deadline_exceeded" and "deadline_ms=400" in reply["error"]["message"]
    assert elapsed < 3, elapsed  # answered at the deadline, not when the work would have ended
    assert _idle(fair, 3), "the dropped work is still queued"


def test_a_deadline_long_enough_changes_nothing(fair):
    with fair.client() as c:
        plain = c.embed(["same input"]).embeddings
        reply = c.request({"op": "embed", "inputs": ["same input"], "deadline_ms": 60_000})
    assert reply["ok"] and reply["embeddings"] == plain.astype("<f4").tobytes()


def test_the_python_client_sends_its_timeout_so_abandoned_work_is_dropped(fair):
    with fair.client(timeout=0.5) as c:
        # The client's own timeout, or the daemon's answer to the deadline it sent when that arrives
        # in the same instant: either way the caller has stopped waiting.
        with pytest.raises((DaemonTimeout, DaemonError)) as info:
            c.embed(INGEST)
        assert not isinstance(info.value, DaemonError) or info.value.code == "deadline_exceeded"
    assert _idle(fair, 3), "the daemon kept computing for a client that had given up"
    with fair.client() as c:
        assert c.embed(["next"]).embeddings.shape[0] == 1
