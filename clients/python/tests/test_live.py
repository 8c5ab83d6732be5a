"""The client alone, installed without torch or numpy, against a running daemon: what a Python caller
does with `pip install ./clients/python`."""

from __future__ import annotations

import asyncio
import math

import pytest
import zmq.auth

from conftest import free_port, start_daemon
from qwen3vl_client import AsyncClient, Client, CurveKeys, DaemonUnavailable, UnknownModel
from qwen3vl_client.client import DaemonTimeout
from qwen3vl_client.protocol import as_lists


def unit(row) -> bool:
    return math.isclose(math.fsum(v * v for v in row), 1.0, rel_tol=1e-4)


def test_it_embeds_texts_through_a_running_daemon(daemon):
    with Client(daemon.endpoint, timeout=60) as client:
        reply = client.embed(["a red bicycle", "a blue boat"])
    rows = as_lists(reply.embeddings)
    assert reply.count == 2 and len(rows[0]) == reply.dimension and all(unit(r) for r in rows)
    assert rows[0] != rows[1] and reply.tokens > 0 and reply.fingerprint


def test_it_embeds_the_same_text_to_the_same_vector_in_a_compact_encoding(daemon):
    with Client(daemon.endpoint, timeout=60) as client:
        a = as_lists(client.embed(["same"], encoding="int8").embeddings)
        b = as_lists(client.embed(["same"], encoding="int8").embeddings)
    assert a == b and all(-128 <= v <= 127 and isinstance(v, int) for v in a[0])


def test_it_reranks_and_reads_health(daemon):
    with Client(daemon.endpoint, timeout=60) as client:
        reply = client.rerank("rivers", ["the Nile", "a recipe", "the Amazon"], top_n=2)
        health = client.health()
    assert len(reply.scores) == 3 and all(0.0 <= s <= 1.0 for s in reply.scores)
    assert reply.top == sorted(range(3), key=lambda i: -reply.scores[i])[:2]
    assert health["status"] == "ready" and health["protocol"] == 1


def test_the_async_client_keeps_many_requests_in_flight(daemon):
    async def run():
        async with AsyncClient(daemon.endpoint, timeout=60) as client:
            return await asyncio.gather(*(client.embed([f"text {i}"]) for i in range(8)))

    replies = asyncio.run(run())
    rows = [as_lists(r.embeddings)[0] for r in replies]
    assert len(rows) == 8 and len({tuple(r) for r in rows}) == 8


def test_a_daemon_error_comes_back_as_its_exception(daemon):
    with Client(daemon.endpoint, timeout=60) as client:
        with pytest.raises(UnknownModel) as err:
            client.embed(["x"], model="no-such-model")
    assert err.value.model == "no-such-model" and err.value.served


def test_curve_keys_load_from_files_and_a_stranger_is_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("server", "client", "stranger"):
        zmq.auth.create_certificates(str(keys), name)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes((keys / "client.key").read_bytes())
    good = CurveKeys.from_files(str(keys / "server.key"), str(keys / "client.key_secret"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, "--curve-secret-key", str(keys / "server.key_secret"),
                          "--curve-authorized-keys", str(authorized), curve=good)
    try:
        with Client(endpoint, timeout=60, curve=good) as client:
            assert client.embed(["over curve"]).count == 1
        stranger = CurveKeys.from_files(str(keys / "server.key"), str(keys / "stranger.key_secret"))
        with Client(endpoint, timeout=1.5, connect_timeout=0.5, curve=stranger) as client:
            with pytest.raises((DaemonTimeout, DaemonUnavailable)):
                client.health()
    finally:
        daemon.stop()


def test_a_dns_name_finds_the_daemon_behind_it(tmp_path):
    port = free_port()
    daemon = start_daemon(tmp_path, f"tcp://127.0.0.1:{port}")
    try:
        with Client(f"dns+tcp://localhost:{port}", timeout=60) as client:
            assert client.embed(["found by name"]).count == 1
            assert f"tcp://127.0.0.1:{port}" in client.daemons()
    finally:
        daemon.stop()
