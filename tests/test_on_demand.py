"""Several models in one daemon, on real tiny checkpoints and real sockets: chosen by name or by
fingerprint, loaded when asked (or at start), unloaded when idle with their memory given back, swapped
under a memory budget, and a load that fails or is interrupted by a drain."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import Bridge, start_daemon
from qwen3vl_client.client import DaemonError, ModelMismatch, UnknownModel
from daemon.loading.fit import checkpoint_shape, estimate
from daemon.loading.tiny import TinySpec, build_tiny_checkpoint

# Wide enough that its weights (~57 MB in float32) stand well above the resident memory's noise.
WIDE = TinySpec(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1536, seed=3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    """Three tiny embedding checkpoints with different weights (seeds 0, 1 and 2)."""
    root = tmp_path_factory.mktemp("several")
    return {"a": tiny_dir, "b": build_tiny_checkpoint(root / "b", TinySpec(seed=1)),
            "c": build_tiny_checkpoint(root / "c", TinySpec(seed=2))}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "wide", WIDE)


@pytest.fixture
def daemons():
    started = []

    def start(tmp: Path, *args: str, **kw):
        daemon = start_daemon(tmp, "--reranker-model", "none", *args, **kw)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)


def rows(client) -> dict[str, dict]:
    return {row["name"]: row for row in client.health()["models"]}


def wait_state(client, name: str, state: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = rows(client)[name]
        if row["state"] == state:
            return row
        time.sleep(0.05)
    raise AssertionError(f"{name} never became {state}: {rows(client)[name]}")


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_two_embedding_models_answer_with_their_own_vectors_by_name_and_by_fingerprint(daemons, checkpoints,
                                                                                       tmp_path):
    daemon = daemons(tmp_path / "two", "--embedding-model", f"small={checkpoints['a']}",
                     "--embedding-model", f"other={checkpoints['b']}")
    alone = daemons(tmp_path / "alone", "--embedding-model", str(checkpoints["b"]))
    texts = ["a query about rivers", "un texte en français"]
    with daemon.client() as client, alone.client() as reference:
        health = client.health()
        models = {row["name"]: row for row in health["models"]}
        assert [(r["name"], r["task"], r["default"], r["state"]) for r in health["models"]] == [
            ("small", "embedding", True, "loaded"), ("other", "embedding", False, "unloaded")]
        assert models["small"]["fingerprint"] == health["embedding"]["fingerprint"]  # the map is the default's
        assert models["other"]["fingerprint"] != models["small"]["fingerprint"]  # known before it loads
        default = client.embed(texts)
        small = client.embed(texts, model="small")
        other = client.embed(texts, model="other")
        by_print = client.embed(texts, expect_fingerprint=models["other"]["fingerprint"])
        expected = reference.embed(texts)
    assert np.array_equal(default.embeddings, small.embeddings)
    assert default.fingerprint == models["small"]["fingerprint"] and other.fingerprint == models["other"]["fingerprint"]
    assert not np.allclose(small.embeddings, other.embeddings)
    np.testing.assert_allclose(other.embeddings, expected.embeddings, rtol=0, atol=1e-6)  # b's own vectors
    assert np.array_equal(by_print.embeddings, other.embeddings) and by_print.model == str(checkpoints["b"])


def test_an_unknown_model_is_refused_naming_it_and_the_models_served(daemons, checkpoints, tmp_path):
    daemon = daemons(tmp_path / "d", "--embedding-model", f"small={checkpoints['a']}",
                     "--embedding-model", f"other={checkpoints['b']}")
    with daemon.client() as client:
        with pytest.raises(UnknownModel) as err:
            client.embed(["x"], model="huge")
        with pytest.raises(ModelMismatch):
            client.embed(["x"], model="other", expect_fingerprint=rows(client)["small"]["fingerprint"])
        with pytest.raises(DaemonError) as no_reranker:
            client.rerank("q", ["d"], model="small")
        assert client.embed(["still serving"]).count == 1
    assert err.value.code == "unknown_model" and err.value.model == "huge" and err.value.served == ["small", "other"]
    assert "no embedding model is named 'huge'" in err.value.message and f"'small' ({checkpoints['a']}), 'other' ({checkpoints['b']})" in err.value.message
    assert no_reranker.value.code == "not_loaded"  # this daemon serves no reranker at all


def test_on_demand_is_ready_with_nothing_loaded_and_every_fingerprint_known(daemons, checkpoints, tmp_path):
    daemon = daemons(tmp_path / "d", "--load", "on-demand", "--embedding-model", f"small={checkpoints['a']}",
                     "--embedding-model", f"other={checkpoints['b']}")
    with daemon.client() as client:
        health = client.health()
        assert health["status"] == "ready" and health["load_mode"] == "on-demand"
        assert {r["name"]: r["state"] for r in health["models"]} == {"small": "unloaded", "other": "unloaded"}
        assert all(len(r["fingerprint"]) == 20 for r in health["models"])
        assert health["embedding"]["loaded"] is False and health["embedding"]["fingerprint"]
        vectors = client.embed(["first request loads the default"])
        assert vectors.fingerprint == health["embedding"]["fingerprint"]
        assert {r["name"]: r["state"] for r in client.health()["models"]} == {"small": "loaded", "other": "unloaded"}


def test_keep_alive_unloads_an_idle_model_gives_its_memory_back_and_a_reload_gives_identical_vectors(
        daemons, wide_dir, tmp_path):
    daemon = daemons(tmp_path / "d", "--embedding-model", str(wide_dir), "--keep-alive", "1s", "--no-warmup")
    texts = ["the same text, twice"]
    with daemon.client() as client:
        first = client.embed(texts)
        loaded = rows(client)["wide"]
        held = resident_bytes(daemon.process.pid)
        row = wait_state(client, "wide", "unloaded")
        time.sleep(0.2)
        freed = held - resident_bytes(daemon.process.pid)
        again = client.embed(texts)
        reloaded = rows(client)["wide"]
    assert loaded["state"] == "loaded" and loaded["memory_bytes"] > 50e6
    assert row["memory_bytes"] == 0 and row["unloads"] == 1
    assert freed >= 0.8 * loaded["memory_bytes"], (freed, loaded["memory_bytes"])
    assert reloaded["state"] == "loaded" and reloaded["loads"] == 2
    assert np.array_equal(first.embeddings, again.embeddings)


def test_a_failing_load_answers_every_waiter_with_the_reason_and_leaves_the_rest_serving(daemons, checkpoints,
                                                                                         tmp_path):
    other = tmp_path / "other"
    shutil.copytree(checkpoints["b"], other)
    daemon = daemons(tmp_path / "d", "--embedding-model", f"small={checkpoints['a']}",
                     "--embedding-model", f"other={other}")
    weights = bytearray((other / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # rewritten after the start fingerprinted it (a change of content, not of metadata)
    (other / "model.safetensors").write_bytes(bytes(weights))
    outcomes: list = []

    def ask() -> None:
        with daemon.client() as c:
            try:
                outcomes.append(c.embed(["x"], model="other"))
            except DaemonError as exc:
                outcomes.append(exc)

    waiters = [threading.Thread(target=ask) for _ in range(3)]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join(60)
    with daemon.client() as client:
        served = client.embed(["the default still serves"])
        row = rows(client)["other"]
    assert len(outcomes) == 3 and all(isinstance(o, DaemonError) and o.code == "not_loaded" for o in outcomes)
    assert all("model.safetensors changed after the daemon fingerprinted it" in o.message for o in outcomes)
    assert served.count == 1 and row["state"] == "failed" and "changed after" in row["error"]


def _budget_for_two(directory: Path, batch_tokens: int) -> int:
    """Room for two of these models and one batch, not three."""
    found = estimate("embedding", checkpoint_shape(directory), "none", "float32", batch_tokens)
    return 2 * found.weights_bytes + max(found.working_bytes, found.transient_bytes) + found.weights_bytes // 2


def test_a_budget_for_two_of_three_models_unloads_the_least_recently_used(daemons, checkpoints, tmp_path):
    budget = _budget_for_two(checkpoints["a"], 256)
    names = [f"--embedding-model={n}={checkpoints[n]}" for n in "abc"]
    daemon = daemons(tmp_path / "d", *names, "--load", "on-demand", "--max-batch-tokens", "256",
                     "--memory-budget", str(budget))
    with daemon.client() as client:
        for name in "aba":  # b is now the least recently used
            client.embed([f"use {name}"], model=name)
        client.embed(["use c"], model="c")
        after_c = {n: r["state"] for n, r in rows(client).items()}
        client.embed(["use b"], model="b")  # a was used before c: a goes
        after_b = {n: r["state"] for n, r in rows(client).items()}
    assert after_c == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert after_b == {"a": "unloaded", "b": "loaded", "c": "loaded"}


def test_a_model_that_fits_no_budget_even_alone_stops_the_start_naming_it(checkpoints, tmp_path):
    budget = _budget_for_two(checkpoints["a"], 256) // 4
    daemon = start_daemon(tmp_path / "d", "--reranker-model", "none", "--embedding-model", str(checkpoints["a"]),
                          "--embedding-model", f"big={checkpoints['b']}", "--load", "on-demand",
                          "--max-batch-tokens", "256", "--memory-budget", str(budget), wait=False)
    assert daemon.process.wait(120) == 1
    assert "would not fit even alone" in daemon.log.read_text()


def test_a_drain_during_a_load_answers_the_waiting_request_and_exits(daemons, wide_dir, tmp_path):
    daemon = daemons(tmp_path / "d", "--load", "on-demand", "--embedding-model", str(wide_dir))
    outcome: dict = {}

    def ask() -> None:
        with daemon.client() as c:
            try:
                outcome["reply"] = c.embed(["asked while nothing is loaded"])
            except DaemonError as exc:
                outcome["error"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    with daemon.client() as client:
        wait_state(client, "wide", "loading")
    daemon.process.send_signal(signal.SIGTERM)
    asker.join(60)
    assert daemon.process.wait(60) == 0
    assert "reply" in outcome or outcome["error"].code == "shutting_down", outcome



def test_the_bridge_routes_model_to_the_daemons_model_of_that_name(daemons, checkpoints, tmp_path):
    daemon = daemons(tmp_path / "d", "--embedding-model", f"small={checkpoints['a']}",
                     "--embedding-model", f"other={checkpoints['b']}")
    bridge = Bridge(daemon.endpoint)
    try:
        with daemon.client() as client, bridge.http() as http:
            other = client.embed(["x"], model="other", dimension=8)
            printed = rows(client)["other"]["fingerprint"]
            by_name = http.post("/v1/embeddings", json={"input": "x", "model": "other", "dimensions": 8})
            by_print = http.post("/v1/embeddings", json={"input": "x", "model": printed, "dimensions": 8})
            default = http.post("/v1/embeddings", json={"input": "x", "dimensions": 8})
            seed = http.post("/embed", json={"texts": ["x"], "dimension": 8})
            missing = http.post("/v1/embeddings", json={"input": "x", "model": "huge"})
            unserved_print = http.post("/v1/embeddings", json={"input": "x", "model": "0123456789abcdef0123"})
            by_path_tail = http.post("/v1/embeddings", json={"input": "x", "model": checkpoints["b"].name,
                                                            "dimensions": 8})
            metrics = http.get("/metrics").text
            small = client.embed(["x"], dimension=8)
    finally:
        bridge.stop()
    for reply in (by_name, by_print, by_path_tail):
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-model-fingerprint"] == printed
        np.testing.assert_allclose(reply.json()["data"][0]["embedding"], other.embeddings[0], atol=1e-6)
    np.testing.assert_allclose(default.json()["data"][0]["embedding"], small.embeddings[0], atol=1e-6)
    np.testing.assert_allclose(seed.json()["embeddings"][0], small.embeddings[0], atol=1e-6)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert missing.json()["error"]["served"] == ["small", "other"]
    assert unserved_print.status_code == 404 and unserved_print.json()["error"]["code"] == "model_not_found"
    assert 'qwen3vl_daemon_model_loads_total{model="embedding:other"} 1.0' in metrics
    assert 'qwen3vl_daemon_model_state{model="embedding:other",state="loaded"} 1.0' in metrics


def test_the_command_line_takes_several_models_by_name_and_from_the_environment(monkeypatch):
    from daemon.commands.serve import config_from_options, serve

    monkeypatch.setenv("QWEN3VL_EMBEDDING_MODEL", "small=/m/e2b, big=/m/e8b")
    monkeypatch.setenv("QWEN3VL_MODEL_SETTINGS", "big.quantize=int8,big.keep-alive=10m")
    params = serve.make_context("serve", ["--reranker-model", "/m/r2b", "--keep-alive", "30s", "--load", "on-demand"]
                                ).params
    params.pop("log_level")
    config = config_from_options(params)
    assert (config.embedding.name, config.embedding.served_name, config.embedding.keep_alive_s) == ("/m/e2b", "small", 30)
    (big,) = config.more_embedding
    assert (big.name, big.served_name, big.quantize, big.keep_alive_s) == ("/m/e8b", "big", "int8", 600)
    assert config.reranker.served_name == "r2b" and config.more_reranker == () and config.load == "on-demand"


def test_none_disables_a_kind_dropping_the_models_given_before_it(monkeypatch):
    from daemon.commands.serve import config_from_options, serve

    def configured(*args: str):
        params = serve.make_context("serve", list(args)).params
        params.pop("log_level")
        return config_from_options(params)

    assert configured("--reranker-model", "/m/r", "--reranker-model", "none").reranker is None
    after = configured("--embedding-model", "none", "--embedding-model", "/m/x")
    assert after.embedding.name == "/m/x" and after.more_embedding == ()


@pytest.mark.parametrize("args, message", [
    (["--embedding-model", "/m/x/model", "--embedding-model", "/m/y/model"], "two embedding models are named 'model'"),
    (["--model-setting", "nobody.dtype=float32"], "no model is named 'nobody'"),
    (["--keep-alive", "a while"], "not a duration"),
    (["--embedding-model", "a=/m/a", "--model-setting", "a.keep-alive=999999999d"], "Invalid value for --model-setting"),
])
def test_the_command_line_refuses_model_lists_that_cannot_work_naming_the_value(args, message, tmp_path):
    from click.testing import CliRunner

    from daemon.main import cli

    result = CliRunner().invoke(cli, ["serve", "--endpoint", f"ipc://{tmp_path}/d.sock", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_two_models_of_one_fingerprint_never_share_cached_vectors(daemons, checkpoints, tmp_path):
    daemon = daemons(tmp_path / "d", "--embedding-model", f"full={checkpoints['a']}",
                     "--embedding-model", f"short={checkpoints['a']}", "--model-setting", "short.max-length=16",
                     "--cache-bytes", "10000000")
    long_text = ["a long text " * 60]
    with daemon.client() as client:
        short = client.embed(long_text, model="short")
        full = client.embed(long_text, model="full")
        again = client.embed(long_text, model="full")
    assert short.fingerprint == full.fingerprint  # the same files: the same fingerprint
    assert short.tokens <= 16 < full.tokens and again.tokens == 0  # the second "full" is a hit, its own
    assert not np.allclose(short.embeddings, full.embeddings)
    assert np.array_equal(full.embeddings, again.embeddings)
