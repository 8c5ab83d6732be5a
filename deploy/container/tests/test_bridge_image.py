"""The slim bridge image's dependency set, run as the image runs it: bridge.requirements.txt installed with
--no-deps in a clean venv; the bridge and the client package from a folder holding only them; started by a
`qwen3vl-bridge` script like the image's; in front of a daemon from another environment.
scripts/test-slim.sh builds that venv and runs this file in it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def call(port: int, path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def image_folder(tmp: Path) -> Path:
    """What the image holds beside its installed packages: http_bridge/, qwen3vl_client/ and the
    `qwen3vl-bridge` script (bridge.Containerfile writes the same one, for its own python)."""
    app = tmp / "app"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "http_bridge", app / "http_bridge", ignore=ignore)
    shutil.copytree(ROOT / "clients" / "python" / "qwen3vl_client", app / "qwen3vl_client", ignore=ignore)
    script = app / "qwen3vl-bridge"
    script.write_text(f"#!{sys.executable}\nfrom http_bridge.cli import main\nmain()\n")
    script.chmod(0o755)
    return app


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    python, checkpoint = os.environ.get("QWEN3VL_TEST_DAEMON_PYTHON"), os.environ.get("QWEN3VL_TEST_CHECKPOINT")
    if not python or not checkpoint:
        pytest.skip("scripts/test-slim.sh runs this with a daemon's python and a tiny checkpoint")
    tmp = tmp_path_factory.mktemp("slim")
    endpoint = f"ipc://{tmp}/daemon.sock"
    daemon = subprocess.Popen([python, "-m", "daemon", "serve", "--endpoint", endpoint, "--log-level", "warning",
                               "--embedding-model", checkpoint, "--reranker-model", checkpoint],
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "QWEN3VL_DTYPE": "float32"},
                              stdout=(tmp / "daemon.log").open("wb"), stderr=subprocess.STDOUT)
    app = image_folder(tmp)
    port = free_port()
    process = subprocess.Popen([str(app / "qwen3vl-bridge"), "--endpoint", endpoint, "--port", str(port)],
                               cwd=app, env={**os.environ, "PYTHONPATH": str(app)},
                               stdout=(tmp / "bridge.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while call(port, "/health")[0] != 200:
            assert daemon.poll() is None, (tmp / "daemon.log").read_text()
            assert process.poll() is None, (tmp / "bridge.log").read_text()
            assert time.monotonic() < deadline, "the daemon was not ready through the bridge in 120 s"
            time.sleep(0.2)
        yield port
    finally:
        stop(process)
        stop(daemon)


def test_the_slim_set_carries_no_torch_numpy_or_daemon(tmp_path):
    # In a fresh interpreter away from the checkout, as the image's python sees its packages.
    probe = ("import importlib.util as u; print([m for m in ('torch', 'transformers', 'numpy', 'PIL', 'daemon') "
             "if u.find_spec(m)])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_image_s_command_is_named_qwen3vl_bridge(tmp_path):
    app = image_folder(tmp_path)
    out = subprocess.run([str(app / "qwen3vl-bridge"), "--help"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(app)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("Usage: qwen3vl-bridge [OPTIONS]")


def test_the_bridge_embeds_through_the_client_alone(bridge):
    status, body = call(bridge, "/embed", {"texts": ["a red bicycle", "a blue boat"]})
    assert status == 200, body
    reply = json.loads(body)
    assert len(reply["embeddings"]) == 2 and len(reply["embeddings"][0]) == reply["dimension"]


def test_openai_embeddings_come_as_floats_and_as_base64_of_the_same_floats(bridge):
    floats = json.loads(call(bridge, "/v1/embeddings", {"input": ["same text"]})[1])["data"][0]["embedding"]
    status, body = call(bridge, "/v1/embeddings", {"input": ["same text"], "encoding_format": "base64"})
    assert status == 200, body
    packed = base64.b64decode(json.loads(body)["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(floats)}f", packed)) == floats


def test_the_bridge_reranks_and_exports_the_daemons_metrics(bridge):
    status, body = call(bridge, "/rerank", {"query": "rivers", "documents": ["the Nile", "a recipe"]})
    assert status == 200 and len(json.loads(body)["scores"]) == 2, body
    status, body = call(bridge, "/metrics")
    assert status == 200 and b"qwen3vl_daemon_queue_depth" in body
