"""A real daemon whose loading and whose forwards wait for files to appear: the test decides when
each ends (a held forward is a daemon busy for as long as the test wants)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.harness import GATED
from conftest import DaemonProcess, wait_ready


def open_gate(gate: Path, name: str) -> None:
    Path(f"{gate}.{name}").touch()


def start_gated(tmp_path: Path, tiny_dir: Path, endpoint: str, *args: str,
                script: str = GATED) -> tuple[DaemonProcess, Path]:
    """A daemon running `script` (GATED or a variant) on `endpoint`, and its gate's path."""
    gate, log = tmp_path / "gate", tmp_path / "daemon.log"
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--endpoint", endpoint, "--embedding-model", str(tiny_dir),
         "--reranker-model", "none", "--log-level", "info", *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", "GATE": str(gate)})
    return DaemonProcess(endpoint, process, log), gate


def hold_forwards(daemon: DaemonProcess, gate: Path) -> None:
    """Let the daemon load and warm up, then hold every forward until the gate opens again."""
    open_gate(gate, "load")
    open_gate(gate, "forward")
    wait_ready(daemon)
    Path(f"{gate}.forward").unlink()


