"""Processes the benchmark and reliability scripts (and the test suite) run against: daemons,
bridges, free ports, media. Run the scripts from the repository root: `.venv/bin/python -m bench.NAME`.

Every process is a real `qwen3vl-daemon serve` or `qwen3vl-bridge` started with this interpreter;
`Servers` owns them and stops them on exit (SIGTERM, then SIGKILL after 30 s).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen3vl_client.client import Client, DaemonError, DaemonTimeout, DaemonUnavailable

ROOT = Path(__file__).resolve().parents[1]


# A daemon whose loading and whose forwards wait for a file to appear: the test decides when each ends.
GATED = """
import os, sys, time
import daemon.engine.backends, daemon.engine.engine
gate = os.environ["GATE"]
def held(original, name):
    def wait(*args, **kwargs):
        while not os.path.exists(gate + "." + name):
            time.sleep(0.02)
        return original(*args, **kwargs)
    return wait
daemon.engine.backends.fingerprint_directory = held(daemon.engine.backends.fingerprint_directory, "load")
daemon.engine.engine.Engine._forward = held(daemon.engine.engine.Engine._forward, "forward")
from daemon.main import main
main()
"""



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(color=(255, 0, 0), size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def gradient_png(seed: int, size=(72, 56)) -> bytes:
    """An image with structure (not one flat color), different per seed."""
    from PIL import Image

    img = Image.new("RGB", size)
    img.putdata([((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x * y + seed) % 256)
                 for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_daemon_ready(endpoint: str, proc: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, timeout=1.0) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"daemon on {endpoint} exited with {proc.returncode}")
            try:
                if c.health()["status"] == "ready":
                    return
            except (DaemonError, DaemonTimeout, DaemonUnavailable):
                pass
            time.sleep(0.1)
    raise RuntimeError(f"daemon on {endpoint} not ready in {timeout_s:g} s")


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on {url}")


@dataclass
class Servers:
    procs: list = field(default_factory=list)
    by_name: dict = field(default_factory=dict)  # the latest process started under each name

    def spawn(self, args: list[str], name: str | None = None, log: Path | None = None, **kw) -> subprocess.Popen:
        out = log.open("ab") if log is not None else subprocess.PIPE
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                text=log is None, **kw)
        self.procs.append(proc)
        if name is not None:
            self.by_name[name] = proc
        return proc

    def daemon(self, work: Path, name: str, ckpt: Path, *extra: str, log_level: str = "error",
               runner: tuple[str, ...] = ("-m", "daemon"), timeout_s: float = 120.0) -> str:
        """Start (or restart, on the same socket) daemon `name` with both models; its endpoint once ready
        (within `timeout_s`). `runner`: what the interpreter runs, ending where the daemon's own
        arguments begin. Its log: work/NAME.log."""
        endpoint = f"ipc://{work}/{name}/daemon.sock"
        proc = self.spawn([sys.executable, *runner, "serve", "--endpoint", endpoint, "--embedding-model",
                           str(ckpt), "--reranker-model", str(ckpt), "--log-level", log_level, *extra],
                          name=name, log=work / f"{name}.log", env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
        wait_daemon_ready(endpoint, proc, timeout_s)
        return endpoint

    def bridge(self, work: Path, name: str, endpoint: str, *extra: str) -> str:
        """Start a bridge to `endpoint`; its base URL once it answers."""
        port = free_port()
        self.spawn([sys.executable, "-m", "http_bridge", "--endpoint", endpoint, "--port", str(port),
                    "--log-level", "warning", *extra], name=name, log=work / f"{name}.log", cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        return url

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
