"""The client's tests run in a venv of their own, with the client alone installed (scripts/test-slim.sh):
no torch, no numpy, no daemon package. The live tests need a daemon, which runs from another
environment: $QWEN3VL_TEST_DAEMON_PYTHON (a python with the daemon installed) on
$QWEN3VL_TEST_CHECKPOINT (a tiny checkpoint: `qwen3vl-daemon tiny-checkpoint DIR`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwen3vl_client import Client, DaemonError, DaemonUnavailable
from qwen3vl_client.client import DaemonTimeout


@dataclass
class Daemon:
    endpoint: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def daemon_command() -> tuple[str, str]:
    python, checkpoint = os.environ.get("QWEN3VL_TEST_DAEMON_PYTHON"), os.environ.get("QWEN3VL_TEST_CHECKPOINT")
    if not python or not checkpoint:
        pytest.skip("set QWEN3VL_TEST_DAEMON_PYTHON and QWEN3VL_TEST_CHECKPOINT to run a daemon (CI does)")
    return python, checkpoint


def start_daemon(tmp: Path, endpoint: str, *args: str, curve=None) -> Daemon:
    python, checkpoint = daemon_command()
    log = tmp / "daemon.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QWEN3VL_DTYPE": "float32"}
    process = subprocess.Popen([python, "-m", "daemon", "serve", "--endpoint", endpoint, "--log-level", "warning",
                                "--embedding-model", checkpoint, "--reranker-model", checkpoint, *args],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(endpoint, process, log)
    deadline = time.monotonic() + 120
    with Client(endpoint, timeout=1.0, curve=curve) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the daemon exited: {log.read_text()}")
            try:
                if client.health()["status"] == "ready":
                    return daemon
            except (DaemonTimeout, DaemonError, DaemonUnavailable):
                time.sleep(0.1)
    daemon.stop()
    raise RuntimeError(f"the daemon was not ready in 120 s: {log.read_text()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def daemon(tmp_path_factory) -> Daemon:
    tmp = tmp_path_factory.mktemp("daemon")
    running = start_daemon(tmp, f"ipc://{tmp}/daemon.sock")
    yield running
    running.stop()
