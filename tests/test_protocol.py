"""The wire protocol on the live daemon: socket kinds, routing, errors, health."""

from __future__ import annotations

import os
import threading

import msgpack
import numpy as np
import pytest
import zmq

from conftest import exchange, gradient_png
from daemon.loading.fingerprint import DigestCache, fingerprint_directory


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


@pytest.fixture
def dealer(daemon):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 30000
    sock.connect(daemon.endpoint)
    yield sock
    sock.close()


def _ask(dealer, payload: bytes) -> dict:
    dealer.send_multipart([b"", payload])
    frames = dealer.recv_multipart()
    assert frames[0] == b"" and len(frames) == 2
    return _unpack(frames[1])


def test_req_client_gets_its_reply(daemon):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger, sock.rcvtimeo = 0, 30000
    sock.connect(daemon.endpoint)
    try:
        sock.send(_pack({"op": "health", "id": "req-1"}))
        reply = _unpack(sock.recv())
    finally:
        sock.close()
    assert reply["id"] == "req-1" and reply["ok"] is True and reply["status"] == "ready"


def test_id_of_any_type_is_echoed(dealer):
    for request_id in ("text", 42, None, [1, "two"], {"k": 1}, b"\x00bin"):
        assert _ask(dealer, _pack({"op": "health", "id": request_id}))["id"] == request_id


def test_dealer_keeps_many_requests_in_flight_each_answered_once(dealer):
    n = 40
    for i in range(n):
        dealer.send_multipart([b"", _pack({"op": "embed", "id": i, "inputs": [f"text {i}"], "dimension": 4})])
    ids = [_unpack(dealer.recv_multipart()[1])["id"] for _ in range(n)]
    assert sorted(ids) == list(range(n))
    assert dealer.poll(300) == 0  # nothing more: each request was answered exactly once


def test_concurrent_clients_each_get_their_own_results(daemon):
    with daemon.client() as c:
        expected = {k: c.embed([f"client {k} says hello"]).embeddings for k in range(4)}
    failures = []

    def run(k: int) -> None:
        with daemon.client() as own:
            for _ in range(8):
                got = own.embed([f"client {k} says hello"]).embeddings
                if not np.allclose(got, expected[k], atol=1e-5):
                    failures.append(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures


def test_health_reports_models_device_and_limits(client, tiny_dir):
    health = client.health()
    assert health["status"] == "ready" and health["protocol"] == 1 and health["version"]
    assert health["device"] == "cpu" and health["dtype"] == "float32"
    fingerprint = fingerprint_directory(tiny_dir, DigestCache(None)).value
    memory = {key: health["embedding"].pop(key) for key in ("weights", "memory_bytes", "memory_estimate_bytes")}
    assert health["embedding"] == {"name": str(tiny_dir), "enabled": True, "loaded": True, "dimension": 64,
                                   "max_dimension": 64, "fingerprint": fingerprint, "quantization": "fixed",
                                   "calibrated_dimensions": None}
    assert memory["weights"] == "float32" and memory["memory_bytes"] > 0 and memory["memory_estimate_bytes"] > 0
    assert health["reranker"]["fingerprint"] == fingerprint
    assert health["reranker"]["loaded"] is True and health["uptime_s"] > 0 and health["queue_depth"] == 0


def test_health_reports_the_time_to_ready_by_stage(client):
    load = client.health()["load"]
    assert load["step"] is None
    assert load["import_s"] > 0 and load["weights_s"] > 0 and load["fingerprint_s"] > 0 and load["warmup_s"] > 0
    assert load["total_s"] >= load["import_s"] + load["weights_s"] + load["fingerprint_s"] + load["warmup_s"]


def test_health_is_answered_at_once_while_a_long_batch_runs(dealer):
    big = {"op": "embed", "id": "big", "inputs": ["long text " * 400] * 64}
    dealer.send_multipart([b"", _pack(big)])
    dealer.send_multipart([b"", _pack({"op": "health", "id": "h"})])
    first = _unpack(dealer.recv_multipart()[1])
    second = _unpack(dealer.recv_multipart()[1])
    assert first["id"] == "h" and first["queue_depth"] == 64
    assert second["id"] == "big" and second["ok"] and second["count"] == 64


@pytest.mark.parametrize("payload, fragment", [
    (b"\xc1 not msgpack", "not a valid msgpack"),
    (_pack([1, 2, 3]), "expected a msgpack map"),
    (_pack({"id": 1}), "op: required"),
    (b"", "not a valid msgpack"),
])
def test_malformed_payloads_get_invalid_request(dealer, payload, fragment):
    reply = _ask(dealer, payload)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_request"
    assert fragment in reply["error"]["message"]


def test_unknown_op_is_unsupported(dealer):
    reply = _ask(dealer, _pack({"op": "generate", "id": 7}))
    assert reply["id"] == 7 and reply["error"]["code"] == "unsupported" and "generate" in reply["error"]["message"]


@pytest.mark.parametrize("request_fields, code, fragment", [
    ({"inputs": "not a list"}, "invalid_request", "inputs: expected a list"),
    ({"inputs": []}, "invalid_request", "inputs: must not be empty"),
    ({"inputs": ["ok", 5]}, "invalid_request", "inputs[1]: expected a string or a map"),
    ({"inputs": ["ok", {"text": ["a", 3]}]}, "invalid_request", "inputs[1].text[1]"),
    ({"inputs": [{"txt": "typo"}]}, "invalid_request", "inputs[0]: unknown field(s) txt"),
    ({"inputs": ["a"], "dimension": 0}, "invalid_request", "dimension"),
    ({"inputs": ["a"], "dimension": 65}, "invalid_request", "dimension: 65 exceeds the model's 64"),
    ({"inputs": ["a"], "encoding": "float16"}, "invalid_request", "encoding"),
    ({"inputs": ["a"], "normalize": "yes"}, "invalid_request", "normalize"),
    ({"inputs": ["a"], "encoding": "binary", "dimension": 12}, "invalid_request", "dimension: binary packs 8"),
    ({"inputs": ["a"], "encoding": "ubinary", "dimension": 63}, "invalid_request", "63 is not a multiple of 8"),
    ({"inputs": ["a"], "encoding": "int8", "normalize": False}, "invalid_request", "normalize: int8 quantizes unit"),
    ({"inputs": ["a"], "encoding": "uint8", "normalize": False}, "invalid_request", "normalize: uint8"),
    ({"inputs": ["a"], "expect_fingerprint": 5}, "invalid_request", "expect_fingerprint: expected a fingerprint"),
    ({"inputs": ["a"], "expect_fingerprint": ""}, "invalid_request", "expect_fingerprint"),
    ({"inputs": ["a"], "expect_fingerprint": "f" * 129}, "invalid_request", "expect_fingerprint"),
    ({"inputs": ["a"], "expect_fingerprint": "0" * 20}, "model_mismatch", "expects the embedding model 00000"),
    ({"inputs": ["a", {"image": "not bytes"}]}, "invalid_request", "inputs[1].image[0]"),
    ({"inputs": ["a", {"image": b"\x89PNG garbage"}]}, "input_error", "inputs[1].image[0]: not a decodable image"),
    ({"inputs": [{"video": [b"junk", b"junk"]}]}, "input_error", "inputs[0].video[0].frames[0]"),
    ({"inputs": [{"fps": -1, "video": {"path": "/x"}}]}, "invalid_request", "inputs[0].fps"),
    ({"inputs": ["a", "x<|image_pad|>y"]}, "input_error", "inputs[1].text[0]: contains the reserved token"),
    ({"inputs": ["a", {"image": {"path": "/etc/passwd"}}]}, "invalid_request", "inputs[1].image[0].path: not under"),
])
def test_bad_embed_requests_name_the_field_and_index(client, request_fields, code, fragment):
    reply = client.request({"op": "embed", **request_fields})
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert fragment in reply["error"]["message"]


@pytest.mark.parametrize("top_n", [0, -1, True, 1.5, "3", [2]])
def test_top_n_other_than_a_positive_integer_is_invalid(client, top_n):
    reply = client.request({"op": "rerank", "query": "q", "documents": ["a"], "top_n": top_n})
    assert reply["error"]["code"] == "invalid_request" and reply["error"]["message"].startswith("top_n:")


def test_bad_rerank_requests_name_the_document(client):
    reply = client.request({"op": "rerank", "query": "q", "documents": ["fine", {"image": b"broken"}]})
    assert reply["error"]["code"] == "input_error" and "documents[1].image[0]" in reply["error"]["message"]
    reply = client.request({"op": "rerank", "query": "q"})
    assert reply["error"]["code"] == "invalid_request" and "documents: required" in reply["error"]["message"]


@pytest.mark.parametrize("encoding", [0, False, "", [], {}, "FLOAT32", 1.5])
def test_encoding_values_other_than_the_named_ones_are_invalid(client, encoding):
    reply = client.request({"op": "embed", "inputs": ["x"], "encoding": encoding})
    assert reply["error"]["code"] == "invalid_request" and reply["error"]["message"].startswith("encoding:")


def test_a_bad_request_does_not_disturb_the_next_one(client):
    assert client.request({"op": "embed", "inputs": [{"image": b"bad"}]})["ok"] is False
    assert client.embed(["still serving"]).embeddings.shape == (1, 64)


def test_symlink_escaping_the_allowed_directory_is_refused(client, media_dir, tmp_path):
    link = media_dir / "escape.png"
    if not link.exists():
        outside = tmp_path / "outside.png"
        outside.write_bytes(gradient_png(1))
        os.symlink(outside, link)
    reply = client.request({"op": "embed", "inputs": [{"image": {"path": str(link)}}]})
    assert reply["error"]["code"] == "invalid_request" and "symbolic link" in reply["error"]["message"]


def test_paths_under_the_allowed_directory_are_read(client, media_dir):
    by_path = client.embed([{"image": {"path": str(media_dir / "red.png")}}]).embeddings
    by_bytes = client.embed([{"image": (media_dir / "red.png").read_bytes()}]).embeddings
    np.testing.assert_allclose(by_path, by_bytes, atol=1e-6)


def test_urls_are_refused_unless_the_operator_enables_them(client):
    reply = client.request({"op": "embed", "inputs": [{"image": {"url": "http://127.0.0.1/x.png"}}]})
    assert reply["error"]["code"] == "invalid_request" and "URL fetching is disabled" in reply["error"]["message"]


def test_video_file_given_as_bytes_equals_the_same_file_by_path(client, media_dir):
    path = media_dir / "clip.mp4"
    by_bytes = client.embed([{"video": path.read_bytes()}]).embeddings
    by_path = client.embed([{"video": {"path": str(path)}}]).embeddings
    np.testing.assert_allclose(by_bytes, by_path, atol=1e-6)


def test_async_client_keeps_many_requests_in_flight(daemon):
    import asyncio

    from qwen3vl_client.client import AsyncClient

    async def main():
        client = AsyncClient(daemon.endpoint, timeout=60)
        try:
            texts = [f"async text {i}" for i in range(24)]
            results = await asyncio.gather(*(client.embed([t], dimension=8) for t in texts))
            together = await client.embed(texts, dimension=8)
            return np.concatenate([r.embeddings for r in results]), together.embeddings
        finally:
            await client.close()

    one_by_one, batched = asyncio.run(main())
    np.testing.assert_allclose(one_by_one, batched, atol=2e-5)


def test_async_client_works_as_an_async_context_manager_and_closes(daemon):
    import asyncio

    from qwen3vl_client.client import AsyncClient

    async def main():
        async with AsyncClient(daemon.endpoint, timeout=60) as client:
            health = await client.health()
            opened = len(client._peers)
        return health, opened, len(client._peers)

    health, opened, after = asyncio.run(main())
    assert health["status"] == "ready" and opened == 1 and after == 0


def test_oversized_payload_error_reaches_the_right_request(daemon):
    # A raw socket: the project's clients refuse such a payload before sending (test_failover.py).
    (reply,) = exchange(daemon.endpoint, [{"op": "embed", "inputs": [{"image": b"\x00" * (64 * 1024 * 1024 + 4096)}]}])
    assert reply["error"]["code"] == "too_large" and reply["id"] is None


def test_metrics_op_reports_counters(client):
    before = client.request({"op": "metrics"})
    client.embed(["counted"])
    client.request({"op": "embed", "inputs": []})
    after = client.request({"op": "metrics"})
    assert after["ok"] and after["requests"]["embed"] == before["requests"].get("embed", 0) + 2
    assert after["errors"]["invalid_request"] == before["errors"].get("invalid_request", 0) + 1
    assert after["tokens"]["embed"] > before["tokens"].get("embed", 0)
    hist = after["latency_s"]["embed"]
    assert hist["counts"][-1] == before["latency_s"]["embed"]["counts"][-1] + 1 and len(hist["counts"]) == len(hist["buckets"]) + 1
    assert after["batch_size"]["counts"][-1] >= 1 and after["queue_depth"] == 0


@pytest.mark.parametrize("path", ["/a\x00b.png", "relative.png", "/etc/passwd", "", "/" + "x" * 5000])
def test_client_mistakes_in_paths_are_the_clients_errors_without_a_traceback(daemon, client, path):
    logged_before = daemon.log.stat().st_size
    for _ in range(20):
        reply = client.request({"op": "embed", "inputs": [{"image": {"path": path}}]})
        assert reply["error"]["code"] in ("invalid_request", "input_error"), reply
        assert reply["error"]["message"].startswith("inputs[0].image[0]"), reply
    with daemon.log.open("rb") as fh:
        fh.seek(logged_before)
        assert b"Traceback" not in fh.read()


def test_a_truncated_video_is_an_input_error_that_says_so(client, tmp_path):
    import subprocess

    clip = tmp_path / "fs.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=4", "-t", "3",
                    "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(clip)], check=True)
    data = clip.read_bytes()
    reply = client.request({"op": "embed", "inputs": [{"video": data[: len(data) // 3]}]})
    assert reply["error"]["code"] == "input_error" and "cannot be decoded" in reply["error"]["message"], reply
    assert "torchvision" not in reply["error"]["message"]
