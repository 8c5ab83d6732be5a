"""Shared fixtures: one tiny checkpoint per run, real daemon processes on real IPC sockets, media."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# No test reaches a model hub: huggingface_hub reads this once, when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every daemon the tests start computes in float32 unless a test says otherwise: the references
# are float32, and `--dtype auto` is bfloat16 on CPUs with native bf16 (test_models checks that choice).
os.environ.setdefault("QWEN3VL_DTYPE", "float32")

import httpx  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from bench.harness import free_port, gradient_png, png_bytes  # noqa: E402,F401 (gradient_png: for the tests)
from qwen3vl_client.client import Client, DaemonError, DaemonTimeout, DaemonUnavailable  # noqa: E402
from daemon.loading.tiny import TinySpec, build_tiny_checkpoint  # noqa: E402


def _w8a8_refusal() -> str | None:
    from daemon.loading.w8a8 import W8A8Unavailable, check_device

    try:
        check_device("cpu")
    except W8A8Unavailable as exc:
        return str(exc)
    return None


# w8a8 runs where the CPU has an int8 kernel (x86-64 with AVX2 or newer); elsewhere its tests say why not.
W8A8_REFUSAL = _w8a8_refusal()
needs_w8a8 = pytest.mark.skipif(W8A8_REFUSAL is not None, reason=f"this CPU cannot run w8a8: {W8A8_REFUSAL}")


@pytest.fixture(scope="session", autouse=True)
def _own_fingerprint_cache(tmp_path_factory):
    """Every daemon the tests start, however started, keeps model digests in the run's own folder,
    never in the user's ~/.cache."""
    os.environ["QWEN3VL_FINGERPRINT_CACHE"] = str(tmp_path_factory.mktemp("fingerprints") / "fingerprints.json")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint carrying Qwen3's own tokenizer (real token boundaries and counts)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("qwen3") / "ckpt", TinySpec(tokenizer="qwen3"))


@dataclass
class DaemonProcess:
    endpoint: str
    process: subprocess.Popen
    log: Path

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.endpoint, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_daemon(tmp: Path, *args: str, env: dict | None = None, wait: bool = True, endpoint: str | None = None,
                 preexec=None) -> DaemonProcess:
    """Start `qwen3vl-daemon serve` on a fresh IPC endpoint and wait until health says ready."""
    tmp.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint or f"ipc://{tmp}/sock/daemon.sock"
    log = tmp / "daemon.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--endpoint", endpoint, "--log-level", "warning", *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env, preexec_fn=preexec,
    )
    daemon = DaemonProcess(endpoint, process, log)
    if wait:
        wait_ready(daemon)
    return daemon


def wait_ready(daemon: DaemonProcess, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    with daemon.client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if daemon.process.poll() is not None:
                raise RuntimeError(f"daemon exited early: {daemon.log.read_text()}")
            try:
                health = client.health()
                if health["status"] == "ready":
                    return health
            except (DaemonTimeout, DaemonError, DaemonUnavailable):
                pass
            time.sleep(0.1)
    raise RuntimeError(f"daemon not ready in {timeout}s: {daemon.log.read_text()}")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """Operator-allowed media directory with a video file (made by ffmpeg) and an image."""
    root = tmp_path_factory.mktemp("media")
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg is required for the video tests (.ci/run installs it)"
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=128x96:rate=4",
                    "-t", "3", "-pix_fmt", "yuv420p", str(root / "clip.mp4")], check=True)
    (root / "red.png").write_bytes(png_bytes((200, 30, 30), (80, 60)))
    return root


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, tiny_dir, media_dir) -> DaemonProcess:
    """The main daemon: both models on the tiny checkpoint, media allowed under media_dir."""
    proc = start_daemon(tmp_path_factory.mktemp("daemon"), "--embedding-model", str(tiny_dir),
                        "--reranker-model", str(tiny_dir), "--allow-path", str(media_dir),
                        "--max-batch-size", "8")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def bridge(daemon) -> "Bridge":
    """A bridge in front of the main daemon, one per test module."""
    b = Bridge(daemon.endpoint)
    yield b
    b.stop()


@pytest.fixture
def client(daemon) -> Client:
    with daemon.client() as c:
        yield c


def exchange(endpoint: str, payloads: list[dict], timeout_s: float = 60.0) -> list[dict]:
    """Send payloads back to back on one DEALER socket; the replies in the order they arrive."""
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, int(timeout_s * 1000)
    sock.connect(endpoint)
    try:
        for payload in payloads:
            sock.send_multipart([b"", msgpack.packb(payload, use_bin_type=True)])
        return [msgpack.unpackb(sock.recv_multipart()[-1]) for _ in payloads]
    finally:
        sock.close()


def pil(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


class Bridge:
    """A real `python -m http_bridge` process on a free port, in front of `endpoint`."""

    def __init__(self, endpoint: str, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: a pipe nobody reads would block a bridge that logs enough.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http_bridge", "--endpoint", endpoint, "--log-level", "warning", *args],
            env={**os.environ, "PORT": str(self.port), **(env or {})},
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/openapi.json", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.log.seek(0)
        raise RuntimeError(self.log.read().decode())

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
