"""Running under systemd: the notify sequence, the watchdog, drain, socket permissions, the units."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from conftest import start_daemon, wait_ready
from bench.probes import NotifySocket

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def test_notify_sequence_status_ready_watchdog_stopping_and_drain(tmp_path, tiny_dir):
    notify = NotifySocket(tmp_path)
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}
    proc = start_daemon(tmp_path / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        env=env, wait=False)
    wait_ready(proc)
    notify.drain(3.5)  # READY, then watchdog pings every WatchdogSec/2 = 1 s
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 60000
    sock.connect(proc.endpoint)
    try:
        sock.send_multipart([b"", msgpack.packb({"op": "embed", "id": "inflight", "inputs": ["word " * 1500] * 48})])
        time.sleep(0.3)
        proc.process.send_signal(signal.SIGTERM)
        reply = msgpack.unpackb(sock.recv_multipart()[1])
    finally:
        sock.close()
    assert proc.process.wait(60) == 0
    notify.drain(0.3)
    notify.close()

    statuses = [f["STATUS"] for _, f in notify.messages if "STATUS" in f]
    assert notify.first("STATUS") < notify.first("READY")
    assert any("loading" in s for s in statuses[: notify.first("READY")])
    assert notify.messages[notify.first("READY")][1]["READY"] == "1"
    pings = [t for t in notify.times("WATCHDOG") if t > notify.times("READY")[0]]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # Due every 1 s, fatal at 2 s: a ping late past 1.9 s (or a burst of them) is the defect.
    assert len(pings) >= 4 and all(0.5 < g < 1.9 for g in gaps[:3]), gaps
    assert notify.first("STOPPING") > notify.first("READY")
    assert reply["id"] == "inflight" and reply["ok"] and reply["count"] == 48


def test_on_demand_readiness_and_status_name_the_mode_and_each_models_state(tmp_path, tiny_dir):
    notify = NotifySocket(tmp_path)
    proc = start_daemon(tmp_path / "d", "--load", "on-demand", "--embedding-model", str(tiny_dir),
                        "--reranker-model", "none", env={"NOTIFY_SOCKET": str(notify.path)}, wait=False)
    try:
        wait_ready(proc)
        with proc.client() as client:
            client.embed(["load it"])
        notify.drain(0.5)
    finally:
        proc.stop()
        notify.close()
    ready = notify.first("READY")
    statuses = [f["STATUS"] for _, f in notify.messages if "STATUS" in f]
    assert "(on-demand): embedding ckpt (unloaded)" in notify.messages[ready][1]["STATUS"]
    assert any(s.endswith("(on-demand): embedding ckpt (loading)") for s in statuses)
    assert any(s.endswith("(on-demand): embedding ckpt (loaded)") for s in statuses)


def _connect_as(path: Path, groups: list[int]) -> subprocess.CompletedProcess:
    """Try a raw connect(2) to the socket as user nobody with the given supplementary groups."""
    def demote():
        os.setgroups(groups)
        os.setgid(65534)
        os.setuid(65534)
    code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); print('connected')"
    return subprocess.run(["/usr/bin/python3", "-c", code], preexec_fn=demote, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to start clients as other users) and /usr/bin/python3")
def test_socket_is_reachable_by_the_group_and_no_one_else(tiny_dir):
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    base.chmod(0o755)
    gid = 4242  # the service group (the Rust server's user would be a member)
    try:
        endpoint_path = base / "run" / "daemon.sock"
        proc = start_daemon(base / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                            "--socket-mode", "0660", endpoint=f"ipc://{endpoint_path}",
                            preexec=lambda: os.setgid(gid))
        try:
            assert stat_mode(endpoint_path.parent) == 0o750 and stat_mode(endpoint_path) == 0o660
            assert endpoint_path.stat().st_gid == gid and endpoint_path.parent.stat().st_gid == gid
            member = _connect_as(endpoint_path, [gid])
            outsider = _connect_as(endpoint_path, [])
            assert member.stdout.strip() == "connected", member.stderr
            assert outsider.returncode != 0 and "PermissionError" in outsider.stderr
        finally:
            assert proc.stop() == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_socket_mode_reachable_by_others_is_refused(tmp_path, tiny_dir):
    result = subprocess.run([sys.executable, "-m", "daemon", "serve", "--socket-mode", "0666",
                             "--embedding-model", str(tiny_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "other users" in result.stderr


def _stage_units(directory: Path) -> dict[str, Path]:
    """The units as the installer lays them out, with ExecStart pointing at stand-in executables
    (verify checks that they exist), and the template instantiated as @0."""
    (directory / "bin").mkdir()
    for name in ("qwen3vl-daemon", "qwen3vl-bridge"):
        exe = directory / "bin" / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    staged = {}
    for unit in UNITS:
        target = directory / unit.name.replace("@.service", "@0.service")
        target.write_text(unit.read_text().replace("/opt/qwen3vl-daemon/venv/bin/", f"{directory}/bin/"))
        staged[unit.name] = target
    return staged


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("unit", [u.name for u in UNITS])
def test_units_pass_systemd_analyze_verify(unit, tmp_path):
    staged = _stage_units(tmp_path)
    # The unit under test first; the others too, so that its dependencies resolve.
    files = [staged[unit]] + [p for name, p in staged.items() if name != unit]
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, files)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if "qwen3vl" in line], result.stderr


def test_there_are_the_three_units():
    assert [u.name for u in UNITS] == ["qwen3vl-bridge.service", "qwen3vl-daemon.service", "qwen3vl-daemon@.service"]


def test_load_progress_extends_the_start_timeout_only_while_the_download_moves(tmp_path):
    from daemon.serving.notify import LoadProgress, Notifier

    notify = NotifySocket(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    progress = LoadProgress(Notifier({"NOTIFY_SOCKET": str(notify.path)}), cache, lambda: "loading model X",
                            interval_s=0.1).start()
    try:
        for i in range(5):  # a download that moves
            (cache / f"part{i}").write_bytes(b"x" * 100_000)
            time.sleep(0.1)
        moving = len(notify.times("EXTEND_TIMEOUT_USEC"))
        time.sleep(0.6)  # a download that stalls
        stalled = len(notify.times("EXTEND_TIMEOUT_USEC")) - moving
    finally:
        progress.stop()
        notify.close()
    statuses = [f["STATUS"] for _, f in notify.messages if "STATUS" in f]
    assert moving >= 2 and stalled <= 1
    assert any("loading model X" in s and "GB in the model cache" in s for s in statuses)
