"""Daemon processes with other settings: limits, disabled models, faults, shutdown, the socket, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from safetensors.torch import load_file, save_file

import numpy as np

from conftest import exchange, gradient_png, start_daemon
from qwen3vl_client.endpoints import default_endpoint


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_dir):
    proc = start_daemon(tmp_path_factory.mktemp("limited"), "--embedding-model", str(tiny_dir),
                        "--reranker-model", "none", "--max-inputs", "16", "--max-queued-inputs", "8",
                        "--max-message-bytes", "65536",
                        "--max-queued-tokens", "20000")
    yield proc
    proc.stop()


def test_disabled_model_answers_not_loaded(limited):
    with limited.client() as c:
        reply = c.request({"op": "rerank", "query": "q", "documents": ["d"]})
        health = c.health()
    assert reply["error"]["code"] == "not_loaded" and "reranker" in reply["error"]["message"]
    assert health["reranker"] == {"name": None, "enabled": False, "loaded": False, "fingerprint": None,
                                  "weights": None, "memory_bytes": None, "memory_estimate_bytes": None}


def test_too_many_inputs_is_too_large_naming_the_limit(limited):
    with limited.client() as c:
        reply = c.request({"op": "embed", "inputs": ["x"] * 17})
    assert reply["error"]["code"] == "too_large" and "max_inputs" in reply["error"]["message"]


def test_oversized_payload_is_too_large(limited):
    with limited.client() as c:
        reply = c.request({"op": "embed", "inputs": ["x" * 70000]})
    assert reply["error"]["code"] == "too_large" and "max_message_bytes" in reply["error"]["message"]


def test_request_beyond_queue_capacity_is_too_large(limited):
    with limited.client() as c:
        reply = c.request({"op": "embed", "inputs": ["x"] * 9})
    assert reply["error"]["code"] == "too_large" and "max_queued_inputs" in reply["error"]["message"]


def test_full_queue_answers_overloaded_at_once(limited):
    replies = exchange(limited.endpoint, [{"op": "embed", "id": "fill", "inputs": ["word " * 400] * 8},
                                          {"op": "embed", "id": "late", "inputs": ["x"]}])
    assert [r["id"] for r in replies] == ["late", "fill"]
    assert replies[0]["error"]["code"] == "overloaded" and replies[1]["ok"]


def test_full_queue_refuses_media_before_decoding_it(limited):
    # The image is corrupt: a decode would answer input_error. overloaded proves it was never read.
    replies = {r["id"]: r for r in exchange(limited.endpoint, [
        {"op": "embed", "id": "fill", "inputs": ["word " * 400] * 8},
        {"op": "embed", "id": "media", "inputs": [{"image": b"\x89PNG corrupt" * 1000}]}])}
    assert replies["media"]["error"]["code"] == "overloaded" and replies["fill"]["ok"]


def test_queued_tokens_bound_answers_overloaded(limited):
    # fill: 4 x (128 + 4850) = 19912 estimated tokens, within the 20000 bound; with late's 129, over it.
    replies = {r["id"]: r for r in exchange(limited.endpoint, [
        {"op": "embed", "id": "fill", "inputs": ["word " * 970] * 4}, {"op": "embed", "id": "late", "inputs": ["x"]}])}
    assert replies["late"]["error"]["code"] == "overloaded" and "tokens" in replies["late"]["error"]["message"]
    assert replies["fill"]["ok"]


def test_a_request_over_the_queued_tokens_bound_by_itself_is_too_large_even_when_idle(limited):
    with limited.client() as c:
        assert c.health()["queue_depth"] == 0
        reply = c.request({"op": "embed", "inputs": ["word " * 1100] * 4})  # ~22,500 estimated tokens
        assert reply["error"]["code"] == "too_large" and "(max_queued_tokens)" in reply["error"]["message"]
        assert c.embed(["still serving"]).embeddings.shape[0] == 1


def test_non_finite_output_is_an_internal_error_naming_the_input(tmp_path, tiny_dir):
    nan_dir = tmp_path / "nan"
    shutil.copytree(tiny_dir, nan_dir)
    weights = load_file(nan_dir / "model.safetensors")
    key = next(k for k in weights if k.endswith("language_model.norm.weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, nan_dir / "model.safetensors", metadata={"format": "pt"})
    proc = start_daemon(tmp_path / "d", "--embedding-model", str(nan_dir), "--reranker-model", "none")
    try:
        with proc.client() as c:
            reply = c.request({"op": "embed", "inputs": ["a", "b"]})
            assert reply["error"]["code"] == "internal" and reply["error"]["message"].startswith("inputs[0]")
            assert c.health()["status"] == "ready"  # and it keeps serving
    finally:
        proc.stop()


def test_sigterm_drains_accepted_requests_refuses_new_ones_and_exits_0(tmp_path, tiny_dir):
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 60000
    sock.connect(proc.endpoint)
    try:
        pack = lambda o: msgpack.packb(o, use_bin_type=True)  # noqa: E731
        sock.send_multipart([b"", pack({"op": "embed", "id": "accepted", "inputs": ["word " * 1500] * 48})])
        time.sleep(0.3)
        proc.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sock.send_multipart([b"", pack({"op": "embed", "id": "late", "inputs": ["x"]})])
        replies = {r["id"]: r for r in (msgpack.unpackb(sock.recv_multipart()[1]) for _ in range(2))}
    finally:
        sock.close()
    assert replies["late"]["error"]["code"] == "shutting_down"
    assert replies["accepted"]["ok"] and replies["accepted"]["count"] == 48
    assert proc.process.wait(30) == 0


def test_socket_directory_and_socket_are_owner_only(daemon):
    path = Path(daemon.endpoint[len("ipc://"):])
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_second_daemon_on_a_live_socket_refuses_to_start(daemon, tiny_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--endpoint", daemon.endpoint, "--embedding-model",
         str(tiny_dir), "--reranker-model", "none"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "another daemon is serving" in result.stderr


def test_stale_socket_file_is_replaced_at_start(tmp_path, tiny_dir):
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir(mode=0o700)
    leftover = socket.socket(socket.AF_UNIX)  # a bound-then-abandoned socket file, as a crash leaves it
    leftover.bind(str(sock_dir / "daemon.sock"))
    leftover.close()
    assert (sock_dir / "daemon.sock").exists()
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    try:
        with proc.client() as c:
            assert c.health()["status"] == "ready"
    finally:
        assert proc.stop() == 0


def test_unloadable_model_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--endpoint", f"ipc://{tmp_path}/s/d.sock",
         "--embedding-model", str(tmp_path / "no-such-model"), "--reranker-model", "none", "--offline"],
        capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1
    assert lines[-1].startswith("qwen3vl-daemon: cannot load model") and "Traceback" not in result.stderr


def test_pickled_checkpoint_is_refused_unread(tmp_path, tiny_dir):
    """A .bin checkpoint is a pickle, which can run code when loaded: only safetensors are read."""
    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_dir, ckpt)
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--endpoint", f"ipc://{tmp_path}/s/d.sock",
         "--embedding-model", str(ckpt), "--reranker-model", "none", "--offline"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "pickled .bin weights, which are never loaded" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_cli_client_commands_print_json(daemon):
    run = lambda *a: subprocess.run([sys.executable, "-m", "daemon", *a, "--endpoint", daemon.endpoint],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(run("health"))["status"] == "ready"
    embedded = json.loads(run("embed", "hello", "world", "--dimension", "8"))
    assert embedded["dimension"] == 8 and len(embedded["embeddings"]) == 2
    reranked = json.loads(run("rerank", "query", "doc one", "doc two"))
    assert len(reranked["scores"]) == 2


def _cli(*args: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    extra = ("--endpoint", endpoint) if endpoint else ()
    return subprocess.run([sys.executable, "-m", "daemon", *args, *extra], capture_output=True, text=True,
                          timeout=120)


def test_cli_embed_text_with_media_is_one_input_unless_separate(daemon, media_dir, tmp_path):
    image, clip = str(media_dir / "red.png"), str(media_dir / "clip.mp4")
    frames = [str(tmp_path / f"f{i}.png") for i in range(2)]
    for i, f in enumerate(frames):
        Path(f).write_bytes((media_dir / "red.png").read_bytes() if i else gradient_png(i))
    together = json.loads(_cli("embed", "a red bicycle", "--image", image, endpoint=daemon.endpoint).stdout)
    apart = json.loads(_cli("embed", "a red bicycle", "--image", image, "--separate", endpoint=daemon.endpoint).stdout)
    everything = json.loads(_cli("embed", "caption", "--image", image, "--video", clip, "--frame", frames[0],
                                 "--frame", frames[1], endpoint=daemon.endpoint).stdout)
    texts = json.loads(_cli("embed", "one", "two", endpoint=daemon.endpoint).stdout)
    assert len(together["embeddings"]) == 1 and len(apart["embeddings"]) == 2
    assert len(everything["embeddings"]) == 1 and len(texts["embeddings"]) == 2
    with daemon.client() as c:
        expected = c.embed([{"text": ["a red bicycle"], "image": [(media_dir / "red.png").read_bytes()]}]).embeddings
    np.testing.assert_allclose(np.array(together["embeddings"]), expected, atol=1e-5)


def test_cli_names_a_bad_file_by_its_name(daemon, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not an image at all")
    result = _cli("embed", "text", "--image", str(bad), endpoint=daemon.endpoint)
    assert result.returncode == 1 and f"{bad} (inputs[0].image[0])" in result.stderr, result.stderr


@pytest.mark.parametrize("timeout", ["0", "-1"])
def test_cli_timeout_must_be_positive(daemon, timeout):
    result = _cli("health", "--timeout", timeout, endpoint=daemon.endpoint)
    assert result.returncode == 2 and "--timeout" in result.stderr


def test_serve_help_names_every_environment_variable():
    text = " ".join(_cli("serve", "--help").stdout.split())
    for name in ("QWEN3VL_MAX_INPUTS", "QWEN3VL_EMBEDDING_MAX_LENGTH", "QWEN3VL_ALLOW_PATHS", "QWEN3VL_LOG_LEVEL",
                 "QWEN3VL_WARMUP", "QWEN3VL_ATTN_IMPLEMENTATION", "QWEN3VL_MAX_VIDEO_PIXELS", "EMBEDDING_MODEL"):
        assert name in text.replace("- ", "-").replace("_ ", "_"), name


def test_cli_builds_a_tiny_checkpoint_usable_as_either_model(tmp_path):
    subprocess.run([sys.executable, "-m", "daemon", "tiny-checkpoint", str(tmp_path / "t")], check=True,
                   capture_output=True, timeout=120)
    names = {p.name for p in (tmp_path / "t").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "t").iterdir()} == {0o666 & ~umask}


def test_clients_find_the_system_socket_when_theirs_is_absent(tmp_path):
    from qwen3vl_client.endpoints import client_endpoint

    system = tmp_path / "run" / "daemon.sock"
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "user")}
    assert client_endpoint(env, system) == f"ipc://{tmp_path}/user/qwen3vl/daemon.sock"  # neither exists
    system.parent.mkdir()
    system.touch()
    assert client_endpoint(env, system) == f"ipc://{system}"
    own = tmp_path / "user" / "qwen3vl" / "daemon.sock"
    own.parent.mkdir(parents=True)
    own.touch()
    assert client_endpoint(env, system) == f"ipc://{own}"
    assert client_endpoint({**env, "QWEN3VL_ENDPOINT": "ipc:///x"}, system) == "ipc:///x"


def test_missing_socket_parents_are_created_owner_only(tmp_path):
    from daemon.serving.server import prepare_socket_dir

    prepare_socket_dir(tmp_path / "a" / "b" / "c" / "daemon.sock")
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_default_endpoint_prefers_runtime_directory_then_xdg_then_tmp():
    assert default_endpoint({"RUNTIME_DIRECTORY": "/run/q:/run/other"}) == "ipc:///run/q/qwen3vl/daemon.sock"
    assert default_endpoint({"XDG_RUNTIME_DIR": "/run/user/7"}) == "ipc:///run/user/7/qwen3vl/daemon.sock"
    assert default_endpoint({"QWEN3VL_ENDPOINT": "tcp://127.0.0.1:5555"}) == "tcp://127.0.0.1:5555"
    assert default_endpoint({}).endswith("/qwen3vl/daemon.sock")


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_drain_timeout_answers_every_accepted_request_and_exits_in_time(tmp_path, tiny_dir):
    """The reported overrun: --drain-timeout with far more queued work than it allows. Every accepted
    request gets exactly one reply (its result, or shutting_down), and the process exits within the
    drain timeout plus the forward in progress."""
    drain = 2.0
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        "--drain-timeout", str(drain), "--max-batch-size", "8")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 30_000
    sock.connect(proc.endpoint)
    try:
        for i in range(8):
            sock.send_multipart([b"", _pack({"op": "embed", "id": i, "inputs": ["word " * 1500] * 64})])
        time.sleep(0.5)
        signalled = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        replies = [msgpack.unpackb(sock.recv_multipart()[-1]) for _ in range(8)]
        exit_code = proc.process.wait(30)
        exited = time.monotonic() - signalled
        sock.rcvtimeo = 200
        with pytest.raises(zmq.Again):
            sock.recv_multipart()  # no second reply to anyone
    finally:
        sock.close()
    assert sorted(r["id"] for r in replies) == list(range(8))
    codes = [r["error"]["code"] for r in replies if not r["ok"]]
    assert codes and set(codes) == {"shutting_down"}, replies
    assert all(r["count"] == 64 for r in replies if r["ok"])
    assert exit_code == 0
    assert exited < drain + 5, exited  # drain timeout + the forward in progress (well under 1 s here)


def test_sigterm_while_loading_stops_between_steps(tmp_path, tiny_dir):
    from bench.probes import NotifySocket

    notify = NotifySocket(tmp_path)
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir),
                        "--log-level", "info", wait=False, env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        deadline = time.monotonic() + 60
        while not any("loading" in f.get("STATUS", "") for _, f in notify.messages):
            assert time.monotonic() < deadline and proc.process.poll() is None
            time.sleep(0.01)
        signalled = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(60) == 0
        exited = time.monotonic() - signalled
    finally:
        notify.close()
    log = proc.log.read_text()
    assert "stopped while loading" in log, log
    assert "loading reranker model" not in log and "warming up" not in log, log
    assert notify.times("STOPPING") and not notify.times("READY")
    assert exited < 30, exited


# A daemon whose fingerprinting step never ends, as a weight file on a hung network mount would.
BLOCKED_LOAD = """
import sys, threading
import daemon.engine.backends
daemon.engine.backends.fingerprint_directory = lambda *args, **kwargs: threading.Event().wait()
from daemon.main import main
main()
"""


def test_sigterm_while_a_loading_step_blocks_stops_the_daemon_at_once(tmp_path, tiny_dir):
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_LOAD, "serve", "--endpoint", f"ipc://{tmp_path}/s/d.sock",
                             "--embedding-model", str(tiny_dir), "--reranker-model", "none", "--log-level", "info"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 60
        while "fingerprinting" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        exited = time.monotonic() - signalled
    finally:
        proc.kill()
    assert code == 0 and "stopped while loading (fingerprinting" in log.read_text(), log.read_text()
    assert exited < 5, exited  # the defect is a daemon that never stops; a second or so is the design
    assert not (tmp_path / "s" / "d.sock").exists()


def test_a_fifo_as_the_digest_cache_neither_blocks_nor_fails_the_start(tmp_path, tiny_dir):
    os.mkfifo(tmp_path / "cache.json")
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        "--fingerprint-cache", str(tmp_path / "cache.json"))
    try:
        with proc.client() as c:
            assert c.health()["embedding"]["fingerprint"]
    finally:
        proc.stop()


def test_a_fifo_as_the_calibration_file_is_refused_in_one_line(tmp_path, tiny_dir):
    os.mkfifo(tmp_path / "c.json")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--endpoint", f"ipc://{tmp_path}/s/d.sock", "--embedding-model",
         str(tiny_dir), "--reranker-model", "none", "--int8-calibration", str(tmp_path / "c.json")],
        capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "not a regular file" in lines[0], result.stderr


def test_a_stalled_daemon_keeps_its_socket_against_a_second_one(tmp_path, tiny_dir):
    """The reported theft: while A's loop stalls, B must not judge A's socket stale and take it."""
    a = start_daemon(tmp_path / "a", "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    try:
        a.process.send_signal(signal.SIGSTOP)  # stalled: it answers nothing at all
        result = subprocess.run(
            [sys.executable, "-m", "daemon", "serve", "--endpoint", a.endpoint, "--embedding-model",
             str(tiny_dir), "--reranker-model", "none"], capture_output=True, text=True, timeout=120)
        a.process.send_signal(signal.SIGCONT)
        assert result.returncode == 1 and "another daemon is serving" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr  # one line
        with a.client() as c:
            assert c.health()["status"] == "ready"
    finally:
        a.stop()


def test_a_daemon_removes_only_the_socket_file_it_created(tmp_path, tiny_dir):
    a = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    path = Path(a.endpoint[len("ipc://"):])
    os.rename(path, path.with_name("a-moved.sock"))
    other = socket.socket(socket.AF_UNIX)  # what another daemon would have bound at the path
    other.bind(str(path))
    try:
        assert a.stop() == 0
        assert path.exists(), "the daemon removed a socket file that was not its own"
    finally:
        other.close()


def test_after_kill_9_the_next_daemon_takes_the_socket(tmp_path, tiny_dir):
    a = start_daemon(tmp_path / "a", "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    a.stop(signal.SIGKILL)
    b = start_daemon(tmp_path / "b", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                     endpoint=a.endpoint)
    try:
        with b.client() as c:
            assert c.health()["status"] == "ready"
    finally:
        b.stop()


def _broken_checkpoints(root: Path, tiny: Path) -> dict[str, Path]:
    (root / "empty").mkdir()
    for name in ("garbage", "no-tokenizer", "no-weights"):
        shutil.copytree(tiny, root / name)
    (root / "garbage" / "config.json").write_text("{not json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "no-tokenizer" / f).unlink()
    (root / "no-weights" / "model.safetensors").unlink()
    (root / "a-file").write_text("x")
    return {"empty": root / "empty", "garbage": root / "garbage", "no-tokenizer": root / "no-tokenizer",
            "no-weights": root / "no-weights", "a-file": root / "a-file",
            "missing": root / "missing"}


STARTUP_MISTAKES = [
    (["--embedding-model", "{empty}"], "no config.json"),
    (["--embedding-model", "{missing}"], "no such directory"),
    (["--embedding-model", "{garbage}"], "config.json is not valid JSON"),
    (["--embedding-model", "{no-tokenizer}"], "no tokenizer files"),
    (["--embedding-model", "{no-weights}"], "no weights"),
    (["--embedding-model", "{a-file}"], "not a directory"),
    (["--embedding-model", "none"], "both models are disabled"),
    (["--embedding-model", "{tiny}", "--device", "cuda"], "CUDA is not available; pass --device cpu"),
    (["--embedding-model", "{tiny}", "--device", "tpu"], "unknown device"),
    (["--embedding-model", "{tiny}", "--dtype", "bogus"], "unknown --dtype 'bogus'"),
    (["--embedding-model", "{tiny}", "--embedding-dim", "100"], "--embedding-dim 100 is outside 1..64"),
]


@pytest.mark.parametrize("args,fragment", STARTUP_MISTAKES, ids=[f for _, f in STARTUP_MISTAKES])
def test_startup_mistakes_are_one_line_before_any_loading(tmp_path, tiny_dir, args, fragment):
    paths = {**_broken_checkpoints(tmp_path, tiny_dir), "tiny": tiny_dir}
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--endpoint", f"ipc://{tmp_path}/s/d.sock", "--reranker-model",
         "none", "--offline", *argv], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("qwen3vl-daemon: ") and fragment in lines[0], result.stderr
    assert "draining" not in result.stderr and not (tmp_path / "s" / "d.sock").exists()
    assert time.monotonic() - started < 30  # checked before loading (a load takes longer than the import)


def test_the_log_says_ready_and_holds_no_progress_bars(tmp_path, tiny_dir):
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir),
                        "--log-level", "info")
    try:
        with proc.client() as c:
            c.embed([{"video": [gradient_png(1), gradient_png(2)]}])
    finally:
        assert proc.stop() == 0
    log = proc.log.read_text()
    assert "ready on " in log and "s after start" in log, log
    assert "it/s" not in log and "\r" not in log and "qwen-vl-utils using" not in log, log


# What `serve` has set by the time its first check runs (torch, and its OpenMP runtime, come after).
PRINT_OMP = """
import os, sys
import daemon.loading.preflight
def report(config):
    print(*(f"{k}=" + os.environ.get(k, "<unset>") for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")),
          "torch" in sys.modules)
    sys.exit(0)
daemon.loading.preflight.check_config = report
from daemon.main import main
main()
"""


@pytest.mark.parametrize("given, expected", [
    ({}, ("PASSIVE", "<unset>")),  # idle threads sleep at once
    ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", "<unset>")),  # the operator's policy
    ({"GOMP_SPINCOUNT": "10000"}, ("PASSIVE", "10000")),  # the operator's short spin (a dedicated machine)
])
def test_idle_openmp_threads_sleep_unless_the_operator_says_otherwise(tmp_path, tiny_dir, given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    done = subprocess.run([sys.executable, "-c", PRINT_OMP, "serve", "--endpoint", f"ipc://{tmp_path}/d.sock",
                           "--embedding-model", str(tiny_dir)], capture_output=True, text=True, env=env, timeout=60)
    want = [f"OMP_WAIT_POLICY={expected[0]}", f"GOMP_SPINCOUNT={expected[1]}", "False"]
    assert done.stdout.split() == want, done.stdout + done.stderr
