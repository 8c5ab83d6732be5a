"""Faults fail only what they touch and the daemon keeps serving: out of memory, hostile messages,
kill -9 and SIGTERM under load."""

from __future__ import annotations

import os
import signal
import threading
import time

import msgpack
import numpy as np
import torch
import zmq
from hypothesis import HealthCheck, given, settings

from conftest import Bridge, start_daemon
from qwen3vl_client.client import Client
from daemon.config import Batching, DaemonConfig, ModelSettings
from daemon.serving.server import Server
from bench.fuzzing import envelopes, judge, payloads
from bench.scenarios import CLEAR_ERRORS, TEXT, kill_9_under_load


def _serve_in_thread(config: DaemonConfig) -> tuple[Server, threading.Thread]:
    server = Server(config)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    assert server.engine.wait_loaded(120) and server.engine.state == "ready"
    return server, thread


def test_out_of_memory_is_retried_in_smaller_batches_then_fails_only_its_batch(tiny_dir, tmp_path):
    config = DaemonConfig(endpoint=f"ipc://{tmp_path}/s/d.sock", embedding=ModelSettings(str(tiny_dir), dtype="float32"),
                          reranker=None, batching=Batching(max_batch_size=8), warmup=False,
                          fingerprint_cache=tmp_path / "fingerprints.json")
    server, thread = _serve_in_thread(config)
    model = server.engine.backends["embedding:ckpt"].model
    real = model.embed
    sizes: list[int] = []

    def tight_memory(batch, between_layers=None):  # the real forward, behind a device that only fits 2 inputs
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(batch, between_layers)

    texts = [f"text number {i} " * (i + 1) for i in range(8)]
    try:
        with Client(config.endpoint, timeout=60) as c:
            model.embed = tight_memory
            got = c.embed(texts).embeddings
            model.embed = lambda batch, between_layers=None: (_ for _ in ()).throw(torch.OutOfMemoryError("always"))
            failed = c.request({"op": "embed", "inputs": ["no memory at all"]})
            model.embed = real
            want = np.concatenate([c.embed([t]).embeddings for t in texts])
            after = c.embed(["still serving"]).embeddings
    finally:
        server.request_stop()
        thread.join(30)
    assert sizes[0] == 8 and max(sizes[1:]) <= 4 and sizes.count(2) >= 1
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert failed["error"]["code"] == "internal" and "OutOfMemoryError" in failed["error"]["message"]
    assert after.shape == (1, 64)


# -- fuzzing the socket: random frame structures, payloads of every shape, mutated valid requests -----



@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(envelope=envelopes, payload=payloads())
def test_every_well_enveloped_message_gets_exactly_one_reply(daemon, envelope, payload):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 30000
    sock.connect(daemon.endpoint)
    try:
        sock.send_multipart([*envelope, payload])
        verdict = judge(envelope, sock.recv_multipart())
        assert verdict.problem is None, verdict.problem
        assert sock.poll(50) == 0  # and only one
    finally:
        sock.close()
    assert daemon.process.poll() is None


# -- faults under load: kill -9, SIGTERM ------------------------------------------------------------



def test_kill_9_under_load_fails_requests_cleanly_and_everything_recovers_by_itself(tmp_path, tiny_dir):
    args = ("--embedding-model", str(tiny_dir), "--reranker-model", "none")
    daemons = [start_daemon(tmp_path / "d", *args)]
    bridge = Bridge(daemons[0].endpoint, "--timeout", "5")
    with daemons[0].client() as c:
        want = c.embed([TEXT]).embeddings

    def kill() -> None:
        daemons[-1].process.kill()
        daemons[-1].process.wait(10)

    try:
        run = kill_9_under_load(daemons[0].endpoint, bridge.url, want, kill,
                                lambda: daemons.append(start_daemon(tmp_path / "d", *args)))
    finally:
        bridge.stop()
        daemons[-1].stop()
    everything = run.calls
    assert run.stale_socket  # the socket file a crash leaves behind, replaced by the new daemon
    assert run.hung_threads == 0
    assert max(took for _, _, took, _ in everything) < 10.0  # never a hang: bounded by the client timeouts
    assert {o for *_, o in everything if o != "ok"} <= CLEAR_ERRORS
    assert any(o == "http 503" for kind, *_, o in everything if kind == "http")  # the bridge said it was gone
    for key, out in run.outcomes.items():  # every client worked before the kill and again after the restart
        assert any(o == "ok" and s + took < run.killed for s, took, o in out)
        assert any(o == "ok" and s > run.restarted for s, took, o in out), (key, run.killed, run.restarted, out[-6:])
        assert all(o == "ok" for s, _, o in out if s > run.restarted + 1.0)


def test_sigterm_under_load_answers_every_accepted_request_and_refuses_later_ones(tmp_path, tiny_dir):
    d = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    socks = []
    for k in range(8):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger, sock.rcvtimeo = 0, 60000
        sock.connect(d.endpoint)
        for i in range(6):
            texts = [f"client {k} request {i} text {j} " + "word " * 150 for j in range(8)]
            sock.send_multipart([b"", msgpack.packb({"op": "embed", "id": i, "inputs": texts})])
        sock.send_multipart([b"", msgpack.packb({"op": "health", "id": "barrier"})])
        socks.append(sock)
    try:
        accepted: list[list[dict]] = [[] for _ in socks]
        for sock, got in zip(socks, accepted):  # health is answered at once, after the 6 embeds were read
            while (reply := msgpack.unpackb(sock.recv_multipart()[-1]))["id"] != "barrier":
                got.append(reply)
        d.process.send_signal(signal.SIGTERM)
        time.sleep(0.02)  # the main thread is inside a forward: the socket loop must notice anyway
        for sock in socks:
            sock.send_multipart([b"", msgpack.packb({"op": "embed", "id": "late", "inputs": ["late"]})])
        late: dict[int, dict] = {}
        for k, (sock, got) in enumerate(zip(socks, accepted)):
            while len(got) < 6 or k not in late:
                reply = msgpack.unpackb(sock.recv_multipart()[-1])
                if reply["id"] == "late":
                    late[k] = reply
                else:
                    got.append(reply)
    finally:
        for sock in socks:
            sock.close()
    assert d.process.wait(60) == 0
    for got in accepted:
        assert sorted(r["id"] for r in got) == list(range(6))
        assert all(r["ok"] and r["count"] == 8 for r in got), [r.get("error") for r in got if not r["ok"]]
    assert [r["error"]["code"] for r in late.values()] == ["shutting_down"] * 8


def test_clients_that_vanish_mid_request_cost_only_their_own_work(daemon):
    with daemon.client() as c:
        before = c.request({"op": "metrics"})
        for i in range(20):  # each sends a request and is gone before the answer
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.connect(daemon.endpoint)
            sock.send_multipart([b"", msgpack.packb({"op": "embed", "inputs": [f"gone {i} " + "word " * 200] * 4})])
            sock.close(linger=2000)  # linger: the request is delivered, then the socket is gone
        assert c.embed(["others are served"]).embeddings.shape == (1, 64)
        deadline = time.monotonic() + 60
        while c.health()["queue_depth"] and time.monotonic() < deadline:  # their work finishes, capacity returns
            time.sleep(0.05)
        metrics = c.request({"op": "metrics"})
    assert metrics["requests"]["embed"] == before["requests"].get("embed", 0) + 21  # the 20 arrived, and ours
    assert metrics["queue_depth"] == 0
    assert metrics["errors"].get("internal", 0) == before["errors"].get("internal", 0)
    assert daemon.process.poll() is None


def test_internal_tracebacks_are_rate_limited_and_the_rest_counted():
    import logging

    from daemon.logs import TracebackLimiter

    now = [0.0]
    limiter = TracebackLimiter(burst=3, period_s=60, clock=lambda: now[0])
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test.tracebacks")
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        written = []
        for _ in range(100):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                written.append(limiter.log(logger, "forward failed"))
        assert written.count(True) == 3 and len(records) == 3 and all(r.exc_info for r in records)
        now[0] = 61.0
        try:
            raise RuntimeError("again")
        except RuntimeError:
            assert limiter.log(logger, "forward failed")
        assert "97 more internal error traceback(s) left out" in records[3].getMessage()
        assert records[4].exc_info
    finally:
        logger.removeHandler(handler)


def test_library_noise_is_configured_for_this_machine(monkeypatch):
    import logging

    from daemon.logs import quiet_libraries

    for name in ("TORCHCODEC_NUM_THREADS", "HF_HUB_DISABLE_PROGRESS_BARS", "FORCE_QWENVL_VIDEO_READER"):
        monkeypatch.delenv(name, raising=False)
    quiet_libraries(cpu_count=2)
    assert os.environ["TORCHCODEC_NUM_THREADS"] == "2"  # qwen_vl_utils would use 8 on any machine
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["FORCE_QWENVL_VIDEO_READER"] == "torchcodec"
    assert logging.getLogger("qwen_vl_utils.vision_process").getEffectiveLevel() >= logging.ERROR
