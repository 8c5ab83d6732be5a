"""The server on stand-in backends, through a real socket: the path socket → handler → engine →
handler → socket, and what happens when a handler or a backend misbehaves."""

from __future__ import annotations

import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import exchange
from daemon.engine.backends import EMBEDDING
from qwen3vl_client.client import Client
from daemon.config import Batching, DaemonConfig, ModelSettings
from daemon.handlers import INLINE_REPLY_FLOATS
from daemon.serving.server import Outbox, Server
from standins import StandIn, loader


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(*backends) -> str:
        config = DaemonConfig(endpoint=f"ipc://{tmp_path}/s{len(servers)}/d.sock",
                              embedding=ModelSettings("stand-in-embedding"), reranker=None, warmup=False,
                              batching=Batching(max_batch_size=16, prep_workers=1))
        server = Server(config, loader=loader(*backends))
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        assert server.engine.wait_loaded(10)
        servers.append((server, thread))
        return config.endpoint

    yield start
    for server, thread in servers:
        server.request_stop()
        thread.join(30)


def test_a_reply_that_cannot_be_built_is_an_internal_error_and_the_loop_keeps_serving(serve):
    def ragged(batch):  # vectors of different lengths: the embed handler cannot stack them
        return [np.ones(8 if "ragged" not in p.text else 5, np.float32) for p in batch]

    endpoint = serve(StandIn(EMBEDDING, forward=ragged))
    broken, fine = exchange(endpoint, [{"op": "embed", "id": 1, "inputs": ["ragged", "even"]},
                                       {"op": "embed", "id": 2, "inputs": ["even"]}])
    assert broken["id"] == 1 and broken["error"]["code"] == "internal"
    assert broken["error"]["message"].startswith("ValueError")
    assert fine["id"] == 2 and fine["ok"] and fine["count"] == 1


def test_large_replies_are_encoded_off_the_socket_thread_and_reach_their_own_client(serve):
    dim = INLINE_REPLY_FLOATS // 8 + 1  # 8 inputs or more make a reply too large for the socket thread
    endpoint = serve(StandIn(EMBEDDING, dim=dim))

    def client(k: int) -> np.ndarray:
        with Client(endpoint, timeout=30) as c:
            return c.embed(["x" * (k + 1)] * (8 + k), normalize=False).embeddings

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(client, range(6)))
    for k, got in enumerate(results):
        np.testing.assert_array_equal(got, np.full((8 + k, dim), k + 1, np.float32))
    assert any(t.name.startswith("qwen3vl-reply") for t in threading.enumerate())  # the pool starts on first use


def test_metrics_count_replies_built_on_either_thread(serve):
    endpoint = serve(StandIn(EMBEDDING, dim=INLINE_REPLY_FLOATS // 32 + 1))
    with Client(endpoint, timeout=30) as c:
        c.embed(["small"])
        c.embed(["large"] * 32)
        metrics = c.request({"op": "metrics"})
    assert metrics["inputs"]["embed"] == 33
    assert metrics["latency_s"]["embed"]["counts"][-1] == 2


def test_the_outbox_loses_no_completion_posted_from_many_threads_and_rings_once_per_burst():
    """Only a post that finds the outbox empty rings: every other post must still be taken, whatever
    the interleaving with the loop's drain-then-take."""
    outbox, threads, per_thread = Outbox(), 8, 3000
    received: list = []
    wakeups = 0

    def post(k: int) -> None:
        for i in range(per_thread):
            outbox.post((k, i))
            time.sleep(0)  # yield: the outbox empties often, so the loop's take races the posts

    posters = [threading.Thread(target=post, args=(k,)) for k in range(threads)]
    for t in posters:
        t.start()
    while len(received) < threads * per_thread:
        # The loop sleeps until rung: an item left without a wake-up would stall here.
        ready, _, _ = select.select([outbox.wake.fileno()], [], [], 5.0)
        assert ready, f"stalled with {threads * per_thread - len(received)} completions posted and not taken"
        wakeups += 1
        received += outbox.take()
    for t in posters:
        t.join()
    assert sorted(received) == sorted((k, i) for k in range(threads) for i in range(per_thread))
    assert wakeups < threads * per_thread
    outbox.wake.close()
