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


# -- fuzzing the socket: random frame structures and payloads of every shape --------------------
import msgpack  # noqa: E402
import zmq  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
fields = st.sampled_from(["inputs", "query", "documents", "instruction", "dimension", "normalize", "encoding", "id",
                          "text", "image", "video"])
requests = st.builds(lambda op, extra: {"op": op, **extra},
                     st.one_of(st.sampled_from(["embed", "rerank", "health", "metrics"]), values),
                     st.dictionaries(fields, values, max_size=4))
payloads = st.one_of(requests.map(lambda r: msgpack.packb(r, use_bin_type=True)),
                     values.map(lambda v: msgpack.packb(v, use_bin_type=True)), st.binary(max_size=64))
envelopes = st.lists(st.binary(max_size=8), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(envelope=envelopes, payload=payloads)
def test_every_well_enveloped_message_gets_exactly_one_reply(daemon, envelope, payload):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 30000
    sock.connect(daemon.endpoint)
    try:
        sock.send_multipart([*envelope, payload])
        frames = sock.recv_multipart()
        assert frames[:-1] == envelope  # the envelope comes back unchanged
        reply = msgpack.unpackb(frames[-1], raw=False)
        assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["error"]["code"] in {"invalid_request", "unsupported", "input_error", "too_large",
                                              "not_loaded", "overloaded"}, reply
        assert sock.poll(50) == 0  # and only one
    finally:
        sock.close()
    assert daemon.process.poll() is None
