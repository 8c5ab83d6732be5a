"""Faults inside the daemon fail only what they touch, and the daemon keeps serving."""

from __future__ import annotations

import threading

import numpy as np
import torch

from daemon.client import Client
from daemon.config import Batching, DaemonConfig, ModelSettings
from daemon.server import Server


def _serve_in_thread(config: DaemonConfig) -> tuple[Server, threading.Thread]:
    server = Server(config)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    assert server.engine.wait_loaded(120) and server.engine.state == "ready"
    return server, thread


def test_out_of_memory_is_retried_in_smaller_batches_then_fails_only_its_batch(tiny_dir, tmp_path):
    config = DaemonConfig(endpoint=f"ipc://{tmp_path}/s/d.sock", embedding=ModelSettings(str(tiny_dir)),
                          reranker=None, batching=Batching(max_batch_size=8), warmup=False)
    server, thread = _serve_in_thread(config)
    real = server.engine.embedding.embed
    sizes: list[int] = []

    def tight_memory(batch):  # the real forward, behind a device that only fits 2 inputs
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(batch)

    texts = [f"text number {i} " * (i + 1) for i in range(8)]
    try:
        with Client(config.endpoint, timeout=60) as c:
            server.engine.embedding.embed = tight_memory
            got = c.embed(texts).embeddings
            server.engine.embedding.embed = lambda batch: (_ for _ in ()).throw(torch.OutOfMemoryError("always"))
            failed = c.request({"op": "embed", "inputs": ["no memory at all"]})
            server.engine.embedding.embed = real
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
import zmq  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fuzzing import envelopes, judge, payloads  # noqa: E402


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
