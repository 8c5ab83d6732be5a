"""The socket loop: one ROUTER socket, validation, dispatch, and replies from the model thread.

The socket loop runs on its own thread; the models run on the main thread. Replies produced there (or
on preprocessing threads) travel back over an inproc PUSH/PULL pair, because a ZeroMQ socket must only
be used by the thread that owns it.
"""

from __future__ import annotations

import fcntl
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
from .errors import ErrorCode, RequestError, too_large
from .protocol import OPS, HealthRequest, MetricsRequest, decode_payload, error_reply, ok_reply, parse_request

log = logging.getLogger(__name__)

POLL_MS = 100
# A message is routing frames, an empty delimiter and one payload frame. Routing frames are ZeroMQ
# identities (at most 255 bytes each); a few allow for clients' tags and for proxies in between.
MAX_ENVELOPE_FRAMES = 8
MAX_ROUTING_FRAME_BYTES = 255
TRANSPORT_SLACK = 1 << 20  # ZMQ_MAXMSGSIZE is the payload limit plus this; within it, the decoder answers
FLUSH_AFTER_ABORT_S = 2.0  # after the drain deadline: how long to wait for replies already being sent


def _packable(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes))


class StartupError(Exception):
    """The daemon cannot start (socket in use, unsafe directory, model not loadable): one line."""


def _loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def prepare_socket_dir(path: Path, group_shared: bool = False) -> None:
    """Create the socket's directory (and any missing parents) owner-only, and refuse one that
    another user controls."""
    directory = path.parent
    # Owner-only, or also group-traversable when the socket itself is shared with a group.
    mode = 0o750 if group_shared else 0o700
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    for parent in reversed(missing):
        try:
            parent.mkdir(mode=mode)
        except FileExistsError:
            pass
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise StartupError(f"socket directory {directory} belongs to another user; choose another endpoint")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise StartupError(f"socket directory {directory} is world-writable; choose another endpoint")


class SocketLock:
    """Who owns an ipc socket path: the process holding an exclusive flock on `<socket>.lock` for its
    whole life. Not a liveness probe, which a busy daemon can fail; the kernel drops the lock when the
    process dies, however it dies. The lock file itself is never removed (removing it would let two
    processes lock two different files)."""

    def __init__(self, socket_path: Path):
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another daemon is serving on ipc://{self.path.with_suffix('')} "
                               f"(it holds {self.path})") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
        self._lock: SocketLock | None = None  # held while we own an ipc socket path
        self._socket_inode: int | None = None  # the socket file we created: the only one we unlink

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
            self._lock = SocketLock(path)
            self._lock.acquire()
            if path.exists() or path.is_symlink():
                path.unlink()  # we hold the lock: whatever is there was left by a daemon that died
        router = self.ctx.socket(zmq.ROUTER)
        router.linger = 0
        self._secure(router, endpoint)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished clients are dropped silently
        # The transport refuses anything far past the payload limit; within it we answer too_large.
        router.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_bytes + TRANSPORT_SLACK)
        old_umask = os.umask(0o177)
        try:
            router.bind(endpoint)
        except zmq.ZMQError as exc:
            raise StartupError(f"cannot bind {endpoint}: {exc}") from None
        finally:
            os.umask(old_umask)
        if path is not None:
            os.chmod(path, self.config.socket_mode)
            self._socket_inode = os.lstat(path).st_ino
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
            text = f"ready on {self.config.endpoint}: {', '.join(names)}"
            log.info("%s (%.1f s after start)", text, time.monotonic() - self.engine.started_at)
            self.notifier.ready(text)
        elif self.engine.state == "failed":
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
            self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        """Unlink the socket file we created, and only that one (same inode), then drop the lock."""
        path = _ipc_path(self.config.endpoint)
        try:
            if path is not None and self._socket_inode is not None and os.lstat(path).st_ino == self._socket_inode:
                path.unlink()
        except FileNotFoundError:
            pass
        if self._lock is not None:
            self._lock.release()

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
            if self.engine.state == "failed":  # before the stop check: a failed load is not a drain
                raise StartupError(self.engine.load_error or "model loading failed")
            if wakeup_fd is not None and wakeup_fd in events:
                self._check_wakeup()
            if self._stop.is_set() and deadline is None:  # before reading requests: they get shutting_down
                log.info("draining (at most %g s)", self.drain_timeout_s)
                self.notifier.stopping()
                self.engine.drain()
                deadline = time.monotonic() + self.drain_timeout_s
            self.engine.expire()
            if pull in events:
                self._forward_replies(pull, router)
            if router in events:
                self._receive_requests(router)
            if deadline is not None and self.engine.idle() and not events:
                self._forward_replies(pull, router)
                return 0
            if deadline is not None and time.monotonic() > deadline:
                self._abort_and_flush(pull, router)
                return 0

    def _abort_and_flush(self, pull: zmq.Socket, router: zmq.Socket) -> None:
        """The drain deadline passed: every accepted request still unanswered gets `shutting_down`,
        and the replies already on their way are sent before the socket closes."""
        aborted = self.engine.abort_all(RequestError(
            ErrorCode.SHUTTING_DOWN, f"the daemon stopped before this request was done (drain timeout "
                                     f"{self.drain_timeout_s:g} s); retry on another instance"))
        self.engine.stop()  # nothing new starts: queued batches and preprocessing are dropped
        log.warning("drain timeout: %d unfinished request(s) answered shutting_down", aborted)
        end = time.monotonic() + FLUSH_AFTER_ABORT_S
        while True:
            self._forward_replies(pull, router)
            if self.engine.idle() or time.monotonic() > end:
                return
            pull.poll(10)

    def _forward_replies(self, pull: zmq.Socket, router: zmq.Socket) -> None:
        # Checking EVENTS first avoids raising zmq.Again on every pass (measurable at this scale).
        while pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            router.send_multipart(pull.recv_multipart(zmq.NOBLOCK))

    def _receive_requests(self, router: zmq.Socket) -> None:
        for _ in range(1000):  # bounded, so replies and signals are never starved
            if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            frames, refusal = self._read_message(router)
            reply = self._handle(frames) if refusal is None else self._refuse(frames, refusal)
            if reply is not None:
                router.send_multipart(reply)

    def _read_message(self, router: zmq.Socket) -> tuple[list, RequestError | None]:
        """Read one message frame by frame, keeping at most the envelope and one payload: a frame past
        MAX_ENVELOPE_FRAMES + 1, an oversized routing frame, or more bytes in all than the payload
        limit allows are dropped as they are read (never held), and the message is refused."""
        # The payload may be up to the transport's own cap (limit + 1 MiB), so that an oversized payload
        # is answered by the decoder, naming max_message_bytes, with its envelope echoed.
        budget = (self.config.limits.max_message_bytes + TRANSPORT_SLACK
                  + MAX_ENVELOPE_FRAMES * MAX_ROUTING_FRAME_BYTES)
        kept: list = []
        count = total = 0
        refusal = None
        while True:
            frame = router.recv(zmq.NOBLOCK, copy=False)
            count += 1
            total += len(frame.buffer)
            more = frame.more
            if refusal is None:
                if count > MAX_ENVELOPE_FRAMES + 1:
                    refusal = too_large(f"message: more than {MAX_ENVELOPE_FRAMES + 1} frames")
                elif total > budget:
                    refusal = too_large(f"message: more than {budget} bytes in all (max_message_bytes)")
                elif more and count > 1 and len(frame.buffer) > MAX_ROUTING_FRAME_BYTES:
                    refusal = too_large(f"message: a routing frame of over {MAX_ROUTING_FRAME_BYTES} bytes")
                else:
                    kept.append(frame)
            if not more:
                return kept, refusal

    def _refuse(self, frames: list, error: RequestError) -> list | None:
        """Answer a message refused whole: echo its envelope when what was kept of it is one."""
        self.engine.metrics.error(error.code.value)
        envelope = [f.bytes for f in frames]
        if b"" in envelope:
            envelope = envelope[:envelope.index(b"") + 1]
        elif envelope:
            envelope = envelope[:1]
        return [*envelope, error_reply(None, error)] if envelope else None

    def _handle(self, frames: list) -> list[bytes] | None:
        """Validate and dispatch one message; returns an immediate reply or None (queued)."""
        if len(frames) < 2:
            return None  # no payload after the routing id: nothing to answer
        envelope, data = [f.bytes for f in frames[:-1]], frames[-1].buffer
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
        except Exception as exc:  # a bug in handling one message must not stop the socket loop
            self.engine.tracebacks.log(log, "handling a message failed")
            metrics.error(ErrorCode.INTERNAL.value)
            error = RequestError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {str(exc)[:160]}")
            return [*envelope, error_reply(request_id if _packable(request_id) else None, error)]
