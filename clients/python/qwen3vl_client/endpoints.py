"""Where a daemon listens unless told otherwise, and where clients look for it: $QWEN3VL_ENDPOINT,
this user's default socket, or the systemd service's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENDPOINT_ENV = "QWEN3VL_ENDPOINT"
SOCKET_DIR_NAME = "qwen3vl"
SOCKET_FILE_NAME = "daemon.sock"


def systemd_directory(env: dict[str, str], name: str) -> str:
    """The directory systemd gave the service in $`name` (RUNTIME_DIRECTORY, CACHE_DIRECTORY), or "".
    systemd may list several, separated by ':'; the first is ours."""
    return env.get(name, "").split(":")[0]


def default_socket_path(env: dict[str, str] | None = None) -> Path:
    """`qwen3vl/daemon.sock` under $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR, else the temp dir."""
    env = os.environ if env is None else env
    base = systemd_directory(env, "RUNTIME_DIRECTORY") or env.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / SOCKET_DIR_NAME / SOCKET_FILE_NAME


def default_endpoint(env: dict[str, str] | None = None) -> str:
    """The endpoint every command uses unless told otherwise: $QWEN3VL_ENDPOINT or the default socket."""
    env = os.environ if env is None else env
    return env.get(ENDPOINT_ENV) or f"ipc://{default_socket_path(env)}"


SYSTEM_SOCKET = Path("/run") / SOCKET_DIR_NAME / SOCKET_FILE_NAME  # the systemd service's (RuntimeDirectory)


def client_endpoint(env: dict[str, str] | None = None, system_socket: Path = SYSTEM_SOCKET) -> str:
    """Where clients look for the daemon: $QWEN3VL_ENDPOINT; else this user's default socket if it
    exists; else the system service's socket if it exists; else this user's default."""
    env = os.environ if env is None else env
    if env.get(ENDPOINT_ENV):
        return env[ENDPOINT_ENV]
    own = default_socket_path(env)
    if not own.exists() and system_socket.exists():
        return f"ipc://{system_socket}"
    return f"ipc://{own}"
