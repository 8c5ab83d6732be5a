"""The HTTP bridge with a real daemon (tiny model) and a real HTTP client."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import Bridge, gradient_png, start_daemon


@contextlib.contextmanager
def bridge_client(endpoint: str, *args: str):
    """A bridge on `endpoint` with extra arguments, and an HTTP client for it; both end with the block."""
    with Bridge(endpoint, *args) as b, b.http() as http:
        yield http


@pytest.fixture
def http(bridge):
    with bridge.http() as c:
        yield c


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_health_speaks_the_sidecar_contract(http, tiny_dir):
    r = http.get("/health")
    assert r.status_code == 200
    body = r.json()
    sidecar = {"status": "ok", "embedding_model": str(tiny_dir), "reranker_model": str(tiny_dir),
               "embedding_loaded": True, "reranker_loaded": True, "device": "cpu", "embedding_dim": 64}
    assert {key: body[key] for key in sidecar} == sidecar


def test_health_adds_each_models_weights_memory_and_fingerprint(http, client):
    body, daemon = http.get("/health").json(), client.health()
    for kind in ("embedding", "reranker"):
        assert body[f"{kind}_weights"] == daemon[kind]["weights"] == "float32"
        assert body[f"{kind}_memory_bytes"] == daemon[kind]["memory_bytes"] > 0
        assert body[f"{kind}_fingerprint"] == daemon[kind]["fingerprint"]


def test_embed_with_the_exact_body_the_rust_client_sends(http, client):
    raw = b'{"texts":["first text","second text"],"instruction":null,"dimension":null}'
    r = http.post("/embed", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"embeddings", "dimension", "model"} and body["dimension"] == 64
    np.testing.assert_allclose(body["embeddings"], client.embed(["first text", "second text"]).embeddings, atol=1e-6)


def test_embed_dimension_and_instruction_pass_through(http, client):
    r = http.post("/embed", json={"texts": ["x"], "instruction": "Find it", "dimension": 16})
    assert r.status_code == 200 and r.json()["dimension"] == 16
    np.testing.assert_allclose(r.json()["embeddings"], client.embed(["x"], "Find it", 16).embeddings, atol=1e-6)


def test_rerank_with_the_exact_body_the_rust_client_sends(http, client):
    raw = b'{"query":"what is it","documents":["doc a","doc b","doc c"],"instruction":null}'
    r = http.post("/rerank", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert set(r.json()) == {"scores", "model"}
    np.testing.assert_allclose(r.json()["scores"], client.rerank("what is it", ["doc a", "doc b", "doc c"]).scores,
                               atol=1e-6)


def test_multimodal_inputs_as_data_urls(http, client):
    image, frames = gradient_png(1), [gradient_png(2), gradient_png(3)]
    body = {"inputs": [{"text": "caption", "image": data_url(image)},
                       {"video": {"frames": [data_url(f) for f in frames]}}, "plain"], "normalize": False}
    r = http.post("/embed", json=body)
    assert r.status_code == 200, r.text
    want = client.embed([{"text": "caption", "image": image}, {"video": frames}, "plain"], normalize=False)
    np.testing.assert_allclose(r.json()["embeddings"], want.embeddings, atol=1e-5)
    r = http.post("/rerank", json={"query": {"image": data_url(image)}, "documents": ["a", {"text": "b"}]})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["scores"], client.rerank({"image": image}, ["a", "b"]).scores, atol=1e-6)


def test_openai_embeddings_float_and_base64(http, client):
    r = http.post("/v1/embeddings", json={"input": ["a", "b"], "dimensions": 8})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["total_tokens"] > 0
    want = client.embed(["a", "b"], dimension=8).embeddings
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], want, atol=1e-6)
    r = http.post("/v1/embeddings", json={"input": "a", "encoding_format": "base64", "dimensions": 8})
    decoded = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, want[0], atol=1e-6)


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 422, "invalid_request"),
    (json.dumps({"texts": "not a list"}).encode(), 422, "invalid_request"),
    (json.dumps({"texts": ["a"], "dimension": 0}).encode(), 422, "invalid_request"),
    (json.dumps({"texts": ["a"], "dimension": 65}).encode(), 422, "invalid_request"),
    (json.dumps({}).encode(), 422, "invalid_request"),
    (json.dumps({"inputs": [{"image": "!!not base64!!"}]}).encode(), 422, "invalid_request"),
    (json.dumps({"inputs": [{"image": base64.b64encode(b"garbage").decode()}]}).encode(), 422, "input_error"),
    (json.dumps({"texts": ["a"] * 1025}).encode(), 413, "too_large"),
])
def test_bad_embed_bodies_get_the_right_status_and_a_readable_message(http, body, status, code):
    r = http.post("/embed", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_metrics_exposes_bridge_and_daemon_counters(http):
    http.post("/embed", json={"texts": ["m"]})
    text = http.get("/metrics").text
    assert 'qwen3vl_bridge_requests_total{route="/embed",status="200"}' in text
    assert "qwen3vl_daemon_requests_total" in text and "qwen3vl_daemon_batch_size_bucket" in text
    assert 'qwen3vl_daemon_request_seconds_bucket{le="+Inf",op="embed"}' in text


def test_openapi_document_describes_every_route(http):
    spec = http.get("/openapi.json").json()
    assert {"/embed", "/rerank", "/health", "/v1/embeddings", "/v1/rerank", "/metrics"} <= set(spec["paths"])
    assert "413" in spec["paths"]["/embed"]["post"]["responses"]


@pytest.mark.parametrize("path, body, kind", [
    ("/embed", {"texts": ["x"]}, "embedding"),
    ("/rerank", {"query": "q", "documents": ["d"]}, "reranker"),
    ("/v1/embeddings", {"input": "x"}, "embedding"),
    ("/v1/rerank", {"query": "q", "documents": ["d"]}, "reranker"),
])
def test_every_model_route_names_its_model_in_a_header_and_takes_a_pin(http, client, path, body, kind):
    served = client.health()[kind]["fingerprint"]
    r = http.post(path, json=body)
    assert r.status_code == 200 and r.headers["x-model-fingerprint"] == served
    assert http.post(path, json={**body, "expect_fingerprint": served}).status_code == 200
    r = http.post(path, json={**body, "expect_fingerprint": "0" * 20})
    assert r.status_code == 409
    assert r.json()["error"] == {"code": "model_mismatch", "message": r.json()["error"]["message"],
                                 "expected": "0" * 20, "actual": served}


def test_the_sidecar_routes_keep_their_exact_response_bodies(http):
    assert set(http.post("/embed", json={"texts": ["x"]}).json()) == {"embeddings", "dimension", "model"}
    assert set(http.post("/rerank", json={"query": "q", "documents": ["d"]}).json()) == {"scores", "model"}


def test_v1_rerank_takes_multimodal_documents_and_returns_them_as_given(http, client):
    image = data_url(gradient_png(3))
    documents = ["text", {"text": "caption", "image": image}]
    r = http.post("/v1/rerank", json={"query": "q", "documents": documents, "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    scores = client.rerank("q", ["text", {"text": "caption", "image": [gradient_png(3)]}]).scores
    assert {x["index"]: x["document"] for x in results} == {0: {"text": "text"}, 1: documents[1]}
    np.testing.assert_allclose([x["relevance_score"] for x in results], sorted(scores, reverse=True), atol=1e-6)


@pytest.mark.parametrize("body, status, fragment", [
    ({"query": "q", "documents": []}, 422, "documents: must not be empty"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, 422, "top_n"),
    ({"query": "q", "documents": ["d"], "rank_fields": ["title"]}, 400, "rank_fields: not supported"),
    ({"query": "q", "documents": ["d"], "rank_fields": "title"}, 400, "rank_fields: not supported"),
    ({"query": "q", "documents": ["d"], "max_chunks_per_doc": "3"}, 400, "max_chunks_per_doc: not supported"),
    ({"query": "q", "documents": ["d"], "temperature": 1}, 422, "temperature"),
    ({"query": "q", "documents": [{"txt": "typo"}]}, 422, "documents.0"),
])
def test_v1_rerank_refuses_what_it_cannot_do_by_name(http, body, status, fragment):
    r = http.post("/v1/rerank", json=body)
    assert r.status_code == status and fragment in r.json()["error"]["message"], r.text


def test_v1_embeddings_names_its_own_fields_in_errors(http):
    r = http.post("/v1/embeddings", json={"input": "x", "dimensions": 12, "embedding_type": "binary"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("dimensions: binary packs")


def test_unreachable_daemon_is_503_and_health_says_so(tmp_path):
    with bridge_client(f"ipc://{tmp_path}/nobody.sock") as http:
        assert http.get("/health").status_code == 503
        r = http.post("/embed", json={"texts": ["x"]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


def test_bearer_token_is_required_when_configured(daemon, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with bridge_client(daemon.endpoint, "--token-file", str(token)) as http:
        assert http.post("/embed", json={"texts": ["x"]}).status_code == 401
        assert "s3cret" not in http.post("/embed", json={"texts": ["x"]}, headers={"authorization": "Bearer no"}).text
        ok = http.post("/embed", json={"texts": ["x"]}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and http.get("/health").status_code == 200


@pytest.mark.parametrize("content", ["", "\n", "   \t\n"], ids=["empty", "newline", "blank"])
def test_an_empty_or_blank_token_file_refuses_to_start(daemon, tmp_path, content):
    token = tmp_path / "token"
    token.write_text(content)
    result = subprocess.run([sys.executable, "-m", "http_bridge", "--endpoint", daemon.endpoint,
                             "--token-file", str(token), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "empty or blank" in result.stderr


def test_a_blank_token_in_the_environment_refuses_to_start(daemon):
    result = subprocess.run([sys.executable, "-m", "http_bridge", "--endpoint", daemon.endpoint, "--port", "0"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "QWEN3VL_BRIDGE_TOKEN": "  "})
    assert result.returncode == 1 and "QWEN3VL_BRIDGE_TOKEN is blank" in result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "bridge.example"])
def test_a_host_reachable_from_elsewhere_without_a_token_refuses_to_start(daemon, host):
    # Refused before binding anything: nothing listens beyond loopback in this test.
    result = subprocess.run([sys.executable, "-m", "http_bridge", "--endpoint", daemon.endpoint,
                             "--host", host, "--port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--allow-no-token" in result.stderr


@pytest.mark.parametrize("host,token,allowed,ok", [
    ("127.0.0.1", None, False, True), ("::1", None, False, True), ("localhost", None, False, True),
    ("127.0.0.2", None, False, True), ("0.0.0.0", "t", False, True), ("0.0.0.0", None, True, True),
    ("0.0.0.0", None, False, False), ("10.0.0.5", None, False, False)])
def test_exposure_rule(host, token, allowed, ok):
    from http_bridge.cli import check_exposure

    if ok:
        check_exposure(host, token, allowed)
    else:
        with pytest.raises(ValueError):
            check_exposure(host, token, allowed)


def test_head_health_is_answered_like_get(http):
    head, get = http.head("/health"), http.get("/health")
    assert head.status_code == get.status_code == 200 and head.content == b""


def test_fps_range_is_the_daemons(http):
    video = {"frames": [data_url(gradient_png(1)), data_url(gradient_png(2))]}
    r = http.post("/embed", json={"inputs": [{"video": video, "fps": 0.005}]})
    assert r.status_code == 422 and "fps" in r.json()["error"]["message"]


def test_openai_errors_name_the_openai_fields(http):
    r = http.post("/v1/embeddings", json={"input": ["x"], "dimensions": 100000})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("dimensions:"), r.json()


def test_body_over_the_limit_is_413(daemon):
    with bridge_client(daemon.endpoint, "--max-body-bytes", "2000") as http:
        r = http.post("/embed", json={"texts": ["x" * 3000]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert http.post("/embed", json={"texts": ["x" * 100]}).status_code == 200


def test_daemon_slower_than_the_timeout_is_504(daemon):
    with bridge_client(daemon.endpoint, "--timeout", "0.02") as http:
        r = http.post("/rerank", json={"query": "q", "documents": ["word " * 300] * 16})
        # The bridge sends its timeout as the request's deadline: whichever side notices first answers.
        assert r.status_code == 504 and r.json()["error"]["code"] in ("timeout", "deadline_exceeded")


def test_overloaded_daemon_is_429(tmp_path, tiny_dir):
    import asyncio

    d = start_daemon(tmp_path / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                     "--max-queued-inputs", "4")
    b = Bridge(d.endpoint)

    async def burst():
        async with httpx.AsyncClient(base_url=b.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/embed", json={"texts": ["word " * 800] * 4}) for _ in range(6)))

    try:
        statuses = [r.status_code for r in asyncio.run(burst())]
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
    finally:
        b.stop()
        d.stop()


def test_bridge_recovers_by_itself_when_the_daemon_restarts(tmp_path, tiny_dir):
    args = ("--embedding-model", str(tiny_dir), "--reranker-model", "none")
    d = start_daemon(tmp_path / "d", *args)
    b = Bridge(d.endpoint)
    try:
        with b.http() as http:
            assert http.post("/embed", json={"texts": ["before"]}).status_code == 200
            assert d.stop() == 0
            assert http.get("/health").status_code == 503
            assert http.post("/embed", json={"texts": ["down"]}).status_code == 503
            d = start_daemon(tmp_path / "d", *args)
            deadline = time.monotonic() + 30
            while http.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert http.post("/embed", json={"texts": ["after"]}).status_code == 200
    finally:
        b.stop()
        d.stop()


def test_property_based_run_of_the_openapi_document_finds_no_server_error(bridge):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(bridge.url + "/openapi.json")
    failures, calls = [], []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same cases in CI as here; explore more by hand
        @given(case=op.as_strategy())
        def run(case):
            response = case.call(base_url=bridge.url, timeout=60)
            calls.append((case.path, response.status_code))
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:200]))

        run()
    assert not failures, failures[:3]
    paths = {path for path, _ in calls}
    assert {"/embed", "/rerank", "/health", "/v1/embeddings", "/v1/rerank", "/metrics"} <= paths
    assert len(calls) >= 5 * len(paths)


@pytest.mark.parametrize("body", [
    b'{"texts": ["lone \\ud800 surrogate"]}',
    b'{"input": "x", "dimensions": 100000000000000000000000000000}',
    b'{"texts": ["x"], "dimension": 100000000000000000000000000000}',
])
def test_json_that_msgpack_cannot_carry_is_a_422_not_a_server_error(http, body):
    path = "/v1/embeddings" if b'"input"' in body else "/embed"
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text


# -- hostile and broken HTTP clients -------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(daemon):
    b = Bridge(daemon.endpoint, "--header-timeout", "1", "--body-timeout", "1", "--max-body-bytes", "100000")
    yield b
    b.stop()


def _raw_http(bridge: Bridge, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", bridge.port))
    sock.settimeout(10)
    sock.sendall(data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_half_sent_headers_are_dropped_after_the_header_timeout_while_others_are_served(daemon):
    with Bridge(daemon.endpoint, "--header-timeout", "6") as patient:
        slow = [_raw_http(patient, b"POST /embed HTTP/1.1\r\nHost: x\r\n") for _ in range(8)]
        started = time.monotonic()
        with patient.http() as http:  # served at once, not after the stalled connections' 6 s
            assert http.post("/embed", json={"texts": ["not held up"]}).status_code == 200
            assert time.monotonic() - started < 3.0
        assert all(_read_all(s) == b"" for s in slow)  # closed by the bridge, without an answer
        assert time.monotonic() - started < 30.0


def test_body_that_stops_arriving_is_408_while_others_are_served(guarded):
    slow = _raw_http(guarded, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{\"texts\": [")
    with guarded.http() as http:
        assert http.post("/embed", json={"texts": ["not held up"]}).status_code == 200
    head, _, body = _read_all(slow).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "timeout"


def test_streamed_body_over_the_limit_is_413_without_a_declared_length(guarded):
    with guarded.http() as http:
        r = http.post("/embed", content=iter([b'{"texts": ["', b"x" * 60000, b"y" * 60000, b'"]}']),
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


@pytest.mark.parametrize("body", [b"[" * 50000, b'{"texts": ' + b"[" * 50000, b"\xff\xfe not utf-8", b"",
                                  b'{"texts": ["a"]} trailing', b"null"])
def test_body_that_is_not_json_gets_a_4xx_in_the_bridge_error_shape(guarded, body):
    with guarded.http() as http:
        r = http.post("/embed", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text


@pytest.mark.parametrize("body, field", [
    ({"texts": [1, 2]}, "texts.0"), ({"texts": [["nested"]]}, "texts.0"), ({"texts": ["a"], "dimension": "eight"},
    "dimension"), ({"texts": ["a"], "normalize": "maybe"}, "normalize"), ({"query": 5, "documents": ["d"]}, "query"),
    ({"inputs": [{"image": 7}]}, "inputs.0"), ({"inputs": [{"video": "x"}]}, "inputs.0"),
])
def test_wrong_types_name_the_field(guarded, body, field):
    path = "/rerank" if "query" in body else "/embed"
    with guarded.http() as http:
        r = http.post(path, json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    assert r.json()["error"]["message"].startswith(field), r.text


def test_unknown_route_is_404_in_the_bridge_error_shape(guarded):
    with guarded.http() as http:
        r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("body", [
    {"query": "q", "documents": ["d"], "top_n": 10**30},
    {"query": "q", "documents": ["d"], "expect_fingerprint": "x" * 129},
])
def test_v1_rerank_values_msgpack_or_the_daemon_cannot_take_are_client_errors(http, body):
    r = http.post("/v1/rerank", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text


# Every field the socket is strict about, with the values lax parsing would have let through.
STRICT_FIELDS = [
    ("/v1/rerank", {"query": "q", "documents": ["d"]}, "top_n", [True, 1.0, "1"]),
    ("/v1/rerank", {"query": "q", "documents": ["d"]}, "return_documents", [1, "true", "yes"]),
    ("/embed", {"texts": ["a"]}, "dimension", [True, 8.0, "8"]),
    ("/embed", {"texts": ["a"]}, "normalize", [1, 0, "true", "on"]),
    ("/v1/embeddings", {"input": "a"}, "dimensions", [True, 8.0, "8"]),
    ("/embed", {"inputs": [{"text": "a", "max_frames": None}]}, "inputs.0.max_frames", [True, 4.0, "4"]),
    ("/embed", {"inputs": [{"text": "a", "fps": None}]}, "inputs.0.fps", [True, "1.5"]),
]


@pytest.mark.parametrize("path, base, field, value", [
    (path, base, field, value) for path, base, field, values in STRICT_FIELDS for value in values])
def test_a_value_of_the_wrong_type_is_refused_as_the_socket_refuses_it(http, path, base, field, value):
    if "." in field:  # a field of the first input object
        body = {"inputs": [{**base["inputs"][0], field.rsplit(".", 1)[1]: value}]}
    else:
        body = {**base, field: value}
    r = http.post(path, json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    assert r.json()["error"]["message"].startswith(field), r.text


def test_strict_fields_still_take_their_own_types(http):
    assert http.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"], "top_n": 1}).json()["results"]
    assert http.post("/embed", json={"texts": ["a"], "dimension": 8, "normalize": None}).status_code == 200
    frames = {"frames": [data_url(gradient_png(1)), data_url(gradient_png(2))]}
    for fps in (1, 1.5):  # an integer is a number, as on the socket
        assert http.post("/embed", json={"inputs": [{"video": frames, "fps": fps, "max_frames": 2}]}).status_code == 200


@pytest.mark.parametrize("path, body, kind", [
    ("/v1/embeddings", {"input": "x"}, "embedding"), ("/v1/rerank", {"query": "q", "documents": ["d"]}, "reranker")])
def test_the_model_field_takes_the_served_model_and_refuses_another_naming_it(http, client, path, body, kind):
    served = client.health()[kind]
    for name in (served["name"], Path(served["name"]).name, served["fingerprint"]):
        assert http.post(path, json={**body, "model": name}).status_code == 200, name
    r = http.post(path, json={**body, "model": "Qwen/other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert "'Qwen/other'" in r.json()["error"]["message"] and served["name"] in r.json()["error"]["message"]


def test_each_error_code_has_one_status_on_every_route(http):
    """invalid_request is 422 whoever finds it: the schema, the bridge, or the daemon."""
    found = {
        "schema": http.post("/embed", json={"texts": ["a"], "dimension": 0}),
        "bridge": http.post("/v1/embeddings", json={"input": []}),
        "daemon": http.post("/embed", json={"texts": ["a"], "dimension": 65}),
        "encoding": http.post("/embed", json={"texts": ["a"], "dimension": 10**30}),
    }
    assert {k: (r.status_code, r.json()["error"]["code"]) for k, r in found.items()} == dict.fromkeys(
        found, (422, "invalid_request"))
