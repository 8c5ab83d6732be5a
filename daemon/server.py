"""The socket loop: one ROUTER socket, validation, dispatch, and replies from the model thread.

The socket loop runs on its own thread; the models run on the main thread. Replies produced there (or
on preprocessing threads) travel back over an inproc PUSH/PULL pair, because a ZeroMQ socket must only
be used by the thread that owns it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import zmq

from .config import DaemonConfig
from .engine import Engine
from .notify import LoadProgress, Notifier
from .errors import RequestError
from .protocol import OPS, HealthRequest, MetricsRequest, decode_payload, error_reply, ok_reply, parse_request

log = logging.getLogger(__name__)

POLL_MS = 100


class StartupError(Exception):
    """The daemon cannot start (socket in use, unsafe directory, model not loadable): one line."""


def _loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def prepare_socket_dir(path: Path, group_shared: bool = False) -> None:
    """Create the socket's directory owner-only, and refuse one that another user controls."""
    directory = path.parent
    # Owner-only, or also group-traversable when the socket itself is shared with a group.
    directory.mkdir(mode=0o750 if group_shared else 0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise StartupError(f"socket directory {directory} belongs to another user; choose another endpoint")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise StartupError(f"socket directory {directory} is world-writable; choose another endpoint")


def socket_is_alive(ctx: zmq.Context, endpoint: str, timeout_ms: int = 500) -> bool:
    """Whether a daemon answers `health` on endpoint: a live daemon's socket is never replaced."""
    from .protocol import pack

    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send_multipart([b"", pack({"op": "health", "id": "probe"})])
        return bool(sock.poll(timeout_ms))
    finally:
        sock.close()


class Server:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self.ctx = zmq.Context()
        self._reply_endpoint = f"inproc://replies-{id(self)}"
        self._local = threading.local()
        self._stop = threading.Event()
        self.engine = Engine(config, self._send_from_worker)
        self.notifier = Notifier()
        self.drain_timeout_s = config.drain_timeout_s
        self._wakeup: socket.socket | None = None  # readable when SIGTERM/SIGINT arrived (install_signal_handlers)

    # -- replies from other threads -------------------------------------------------------------
    def _send_from_worker(self, envelope: list, payload: bytes) -> None:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.connect(self._reply_endpoint)
            self._local.push = sock
        sock.send_multipart([*envelope, payload])

    # -- lifecycle -------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        """Begin draining: answered requests finish, new ones get `shutting_down`."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start the drain. Python runs signal handlers on the main thread, which
        may be inside a forward for a while; meanwhile the socket loop would keep accepting work.
        So the signal also wakes the socket loop through a wakeup fd, and it stops taking work at once."""
        self._wakeup, writer = socket.socketpair()
        self._wakeup.setblocking(False)
        writer.setblocking(False)
        self._wakeup_writer = writer  # kept open for the process's life
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _check_wakeup(self) -> None:
        try:
            received = self._wakeup.recv(64)
        except BlockingIOError:
            return
        if signal.SIGTERM in received or signal.SIGINT in received:
            self._stop.set()

    def _bind(self) -> zmq.Socket:
        endpoint = self.config.endpoint
        path = _ipc_path(endpoint)
        if path is not None:
            prepare_socket_dir(path, group_shared=bool(self.config.socket_mode & 0o060))
            if path.exists():
                if socket_is_alive(self.ctx, endpoint):
                    raise StartupError(f"another daemon is serving on {endpoint}")
                path.unlink()  # stale socket left by a crash
        router = self.ctx.socket(zmq.ROUTER)
        router.linger = 0
        self._secure(router, endpoint)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished clients are dropped silently
        # The transport refuses anything far past the payload limit; within it we answer too_large.
        router.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_bytes + (1 << 20))
        old_umask = os.umask(0o177)
        try:
            router.bind(endpoint)
        except zmq.ZMQError as exc:
            raise StartupError(f"cannot bind {endpoint}: {exc}") from None
        finally:
            os.umask(old_umask)
        if path is not None:
            os.chmod(path, self.config.socket_mode)
        return router

    def _secure(self, router: zmq.Socket, endpoint: str) -> None:
        """CURVE on the ROUTER when configured; plain tcp:// only on loopback."""
        cfg = self.config
        if cfg.curve_secret_key is None:
            if endpoint.startswith("tcp://") and not _loopback(endpoint):
                raise StartupError(f"{endpoint} is reachable from other hosts: give --curve-secret-key and "
                                   "--curve-authorized-keys (see `qwen3vl-daemon keygen`)")
            return
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        if cfg.curve_authorized_keys is None or not cfg.curve_authorized_keys.is_dir():
            raise StartupError("--curve-authorized-keys must name a directory of client public keys")
        try:
            public, secret = zmq.auth.load_certificate(str(cfg.curve_secret_key))
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot read the CURVE key {cfg.curve_secret_key}: {exc}") from None
        if secret is None:
            raise StartupError(f"{cfg.curve_secret_key} holds no secret key")
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        # Only clients whose public key is in the directory may connect (checked at the handshake).
        self._auth.configure_curve(domain="*", location=str(cfg.curve_authorized_keys))
        router.curve_server = True
        router.curve_publickey, router.curve_secretkey = public, secret

    def serve(self) -> int:
        """Run until stopped; returns the process exit code. The socket loop runs on its own thread
        and the models on the calling (main) thread."""
        router = self._bind()
        log.info("listening on %s", self.config.endpoint)
        outcome: dict = {}
        socket_thread = threading.Thread(target=self._socket_main, args=(router, outcome), name="qwen3vl-socket")
        socket_thread.start()
        try:
            self._load()
            self.engine.run()
        finally:
            self._stop.set()
            socket_thread.join()
            if getattr(self, "_auth", None) is not None:
                self._auth.stop()
            self.ctx.destroy(linger=0)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("code", 0)

    def _load(self) -> None:
        """Load the models, telling systemd how it goes; READY=1 only once they are warm."""
        from huggingface_hub import constants

        self.notifier.status("loading models")
        progress = LoadProgress(self.notifier, Path(constants.HF_HUB_CACHE), lambda: self.engine.loading).start()
        try:
            self.engine.load()
        finally:
            progress.stop()
        if self.engine.state == "ready":
            names = [m.name for m in (self.engine.embedding, self.engine.reranker) if m is not None]
            self.notifier.ready(f"ready on {self.config.endpoint}: {', '.join(names) or 'no models'}")
        else:
            self.notifier.status(f"failed: {self.engine.load_error}")

    def _socket_main(self, router: zmq.Socket, outcome: dict) -> None:
        pull = self.ctx.socket(zmq.PULL)
        pull.bind(self._reply_endpoint)
        try:
            outcome["code"] = self._loop(router, pull)
        except StartupError as exc:
            outcome["error"] = exc
        except Exception as exc:  # never leave the model thread waiting on a dead socket loop
            log.exception("socket loop failed")
            outcome["error"] = StartupError(f"socket loop failed: {exc}")
        finally:
            self.engine.stop()
            router.close(linger=0)
            pull.close(linger=0)
            path = _ipc_path(self.config.endpoint)
            if path is not None and path.exists():
                path.unlink()

    def _loop(self, router: zmq.Socket, pull: zmq.Socket) -> int:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        wakeup_fd = None if self._wakeup is None else self._wakeup.fileno()  # the poller reports plain fds by number
        if wakeup_fd is not None:
            poller.register(wakeup_fd, zmq.POLLIN)
        deadline = None
        # Watchdog pings come from this loop, so a hung loop stops them and systemd restarts us.
        ping_every = self.notifier.watchdog_interval_s
        next_ping = time.monotonic()
        poll_ms = POLL_MS if ping_every is None else max(1, min(POLL_MS, int(ping_every * 500)))
        while True:
            events = dict(poller.poll(poll_ms))
            if ping_every is not None and time.monotonic() >= next_ping:
                self.notifier.watchdog()
                next_ping = time.monotonic() + ping_every
            if wakeup_fd is not None and wakeup_fd in events:
                self._check_wakeup()
            if self._stop.is_set() and deadline is None:  # before reading requests: they get shutting_down
                log.info("draining")
                self.notifier.stopping()
                self.engine.drain()
                deadline = time.monotonic() + self.drain_timeout_s
            if pull in events:
                self._forward_replies(pull, router)
            if router in events:
                self._receive_requests(router)
            if self.engine.state == "failed":
                raise StartupError(self.engine.load_error or "model loading failed")
            if deadline is not None and (self.engine.idle() and not events or time.monotonic() > deadline):
                self._forward_replies(pull, router)
                return 0

    def _forward_replies(self, pull: zmq.Socket, router: zmq.Socket) -> None:
        # Checking EVENTS first avoids raising zmq.Again on every pass (measurable at this scale).
        while pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            router.send_multipart(pull.recv_multipart(zmq.NOBLOCK))

    def _receive_requests(self, router: zmq.Socket) -> None:
        for _ in range(1000):  # bounded, so replies and signals are never starved
            if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            reply = self._handle(router.recv_multipart(zmq.NOBLOCK))
            if reply is not None:
                router.send_multipart(reply)

    def _handle(self, frames: list[bytes]) -> list[bytes] | None:
        """Validate and dispatch one message; returns an immediate reply or None (queued)."""
        if len(frames) < 2:
            return None  # no payload after the routing id: nothing to answer
        envelope, data = frames[:-1], frames[-1]
        request_id = None
        metrics = self.engine.metrics
        try:
            payload = decode_payload(data, self.config.limits)
            request_id = payload.get("id")
            metrics.request(payload["op"] if payload.get("op") in OPS else "other")
            request = parse_request(payload, self.config.limits, self.config.media)
            if isinstance(request, HealthRequest):
                return [*envelope, ok_reply(request.id, **self.engine.health())]
            if isinstance(request, MetricsRequest):
                return [*envelope, ok_reply(request.id, **self.engine.metrics_snapshot())]
            self.engine.submit(envelope, request)
            return None
        except RequestError as exc:
            metrics.error(exc.code.value)
            return [*envelope, error_reply(request_id, exc)]
