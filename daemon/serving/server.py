"""The socket loop: one ROUTER socket; every message decoded, handed to its op's handler, and answered.

The socket loop runs on its own thread and is the only user of the socket; the models run on the main
thread (the engine's). The path of a request: socket → decode (protocol) → handler → engine →
completion → outbox → handler → encode (protocol) → socket. Completions arrive from the model and
preprocessing threads through the Outbox; small replies are encoded on the socket thread, large ones
on a reply thread, so encoding never runs on the model thread and never stalls the socket loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from huggingface_hub import constants as hub_constants
from zmq.auth.thread import ThreadAuthenticator

from daemon.config import DaemonConfig
from daemon.core import Core, StartupError
from daemon.engine.engine import EngineState, Job, JobResult, Loader
from daemon.handlers import Handler
from daemon.loading.fit import describe_memory
from daemon.serving.notify import LoadProgress, Notifier
from qwen3vl_client.discovery import is_ipv6
from qwen3vl_client.errors import ErrorCode, RequestError, internal_error, too_large
from qwen3vl_client.protocol import (MetricsRequest, OPS, Request, decode_payload, encode_error, encode_reply,
                                     parse_request)

log = logging.getLogger(__name__)

POLL_MS = 100
# A message is routing frames, an empty delimiter and one payload frame. Routing frames are ZeroMQ
# identities (at most 255 bytes each); a few allow for clients' tags and for proxies in between.
MAX_ENVELOPE_FRAMES = 8
MAX_ROUTING_FRAME_BYTES = 255
TRANSPORT_SLACK = 1 << 20  # ZMQ_MAXMSGSIZE is the payload limit plus this; within it, the decoder answers
FLUSH_AFTER_ABORT_S = 2.0  # after the drain deadline: how long to wait for replies already being sent
CLOSE_GRACE_S = 0.5  # then: how long the socket stays open for ZeroMQ to write those replies


def _packable(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes))


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


@dataclass(frozen=True)
class Finished:
    """A job's outcome, for the socket loop to turn into a reply."""

    envelope: list
    handler: Handler
    request: Request
    job: Job
    outcome: JobResult | RequestError


@dataclass(frozen=True)
class Encoded:
    """A reply encoded on the reply thread, ready to send."""

    envelope: list
    data: bytes


class WakeUp:
    """A socket pair, both ends non-blocking, whose reading end the socket loop polls beside the
    ROUTER: another thread `ring`s it, or the kernel writes signal numbers to `writer` (set_wakeup_fd)."""

    def __init__(self) -> None:
        self._reader, self.writer = socket.socketpair()
        self._reader.setblocking(False)
        self.writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def ring(self) -> None:
        try:
            self.writer.send(b"\0")
        except BlockingIOError:  # the buffer is full of wake-ups the loop has not read yet: enough
            pass

    def drain(self) -> bytes:
        """Every byte written so far."""
        received = b""
        try:
            while chunk := self._reader.recv(4096):
                received += chunk
        except BlockingIOError:
            pass
        return received

    def wait(self, timeout_s: float) -> None:
        select.select([self._reader], [], [], timeout_s)

    def close(self) -> None:
        self._reader.close()
        self.writer.close()


class Outbox:
    """Completions handed from any thread to the socket loop, the only thread that may use the socket:
    no ZeroMQ socket lives on the model or preprocessing threads."""

    def __init__(self) -> None:
        self._items: list = []
        self._lock = threading.Lock()
        self.wake = WakeUp()

    def post(self, item: Finished | Encoded) -> None:
        """Only the post that finds the outbox empty wakes the loop: a batch's 32 completions cost
        one wake-up, not 32 system calls and as many trips of the loop."""
        with self._lock:
            first = not self._items
            self._items.append(item)
        if first:
            self.wake.ring()

    def take(self) -> list:
        """Everything posted so far. Wake-ups are read before the items are taken, so a post that
        empties nothing rings after this drain and is never missed."""
        self.wake.drain()
        with self._lock:
            items, self._items = self._items, []
        return items


class Server:
    def __init__(self, config: DaemonConfig, loader: Loader | None = None):
        """`loader` fills the engine's backends (default: the configured models); tests pass stand-ins."""
        self.config = config
        self.ctx = zmq.Context()
        self._stop = threading.Event()
        self.notifier = Notifier()
        core = Core.build(config, loader, self._models_changed)
        self.metrics, self.tracebacks = core.metrics, core.tracebacks
        self.engine, self.handlers = core.engine, core.handlers
        self.outbox = Outbox()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen3vl-reply")
        self._in_flight = 0  # jobs admitted whose reply is not yet sent (the socket thread's count)
        self.drain_timeout_s = config.drain_timeout_s
        self._signals: WakeUp | None = None  # readable when SIGTERM/SIGINT arrived (install_signal_handlers)
        self._auth: ThreadAuthenticator | None = None
        self._lock: SocketLock | None = None  # held while we own an ipc socket path
        self._socket_inode: int | None = None  # the socket file we created: the only one we unlink

    # -- lifecycle -------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        """Begin draining: answered requests finish, new ones get `shutting_down`."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start the drain. Python runs signal handlers on the main thread, which
        may be inside a forward for a while; meanwhile the socket loop would keep accepting work.
        So the signal also wakes the socket loop through a wakeup fd, and it stops taking work at once."""
        self._signals = WakeUp()  # kept open for the process's life
        signal.set_wakeup_fd(self._signals.writer.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _check_signals(self) -> None:
        received = self._signals.drain()
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
        if is_ipv6(endpoint):  # `tcp://[::]:5555` also takes IPv4 on Linux
            router.ipv6 = 1
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
        exporter = self._start_exporter()
        outcome: dict = {}
        socket_thread = threading.Thread(target=self._socket_main, args=(router, outcome), name="qwen3vl-socket")
        socket_thread.start()
        try:
            self._load()
            self.engine.run()
        finally:
            self._stop.set()
            socket_thread.join()
            if exporter is not None:
                exporter.stop()
            if self._auth is not None:
                self._auth.stop()
            self._encoder.shutdown(wait=False, cancel_futures=True)
            self.outbox.wake.close()
            self.ctx.destroy(linger=0)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("code", 0)

    def _start_exporter(self):
        """The Prometheus endpoint, when configured: up before the models load, so a scrape sees `loading`."""
        if self.config.metrics_address is None:
            return None
        from daemon.serving.prometheus import MetricsServer

        exporter = MetricsServer(self.config.metrics_address, lambda: self.handlers["metrics"].start(MetricsRequest()))
        try:
            exporter.start()
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {self.config.metrics_address}: {exc}") from None
        return exporter

    def _load(self) -> None:
        """Load the models, telling systemd how it goes; READY=1 only once they are warm."""
        engine = self.engine
        self.notifier.status("loading models")
        progress = LoadProgress(self.notifier, Path(hub_constants.HF_HUB_CACHE), lambda: engine.loading).start()
        try:
            engine.load()
        finally:
            progress.stop()
        if engine.state is EngineState.READY:
            text = f"ready on {self.config.endpoint} ({self.config.load}): {self._describe_models()}"
            report = engine.load_report()
            log.info("%s (%.1f s after start: %s; %s)", text, report.total_s, report.describe(),
                     describe_memory(engine.backends))
            self.notifier.ready(text)
        elif engine.state is EngineState.FAILED:
            self.notifier.status(f"failed: {engine.load_error}")

    def _describe_models(self) -> str:
        """Each model and its state, for systemd's STATUS= line: `embedding small (loaded), ...`."""
        rows = self.engine.models.rows()
        return ", ".join(f"{row['task']} {row['name']} ({row['state']})" for row in rows) or "no models"

    def _models_changed(self) -> None:
        """A model was loaded, unloaded or failed: systemd's status line says so."""
        if self.engine.state is EngineState.READY:  # never waits on a full queue: the socket thread may call it
            self.notifier.send(f"STATUS=ready on {self.config.endpoint} ({self.config.load}): "
                               f"{self._describe_models()}", retry_s=0)

    def _socket_main(self, router: zmq.Socket, outcome: dict) -> None:
        try:
            outcome["code"] = self._loop(router)
        except StartupError as exc:
            outcome["error"] = exc
        except Exception as exc:  # never leave the model thread waiting on a dead socket loop
            log.exception("socket loop failed")
            outcome["error"] = StartupError(f"socket loop failed: {exc}")
        finally:
            self.engine.stop()
            router.close(linger=0)
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

    def _loop(self, router: zmq.Socket) -> int:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        outbox_fd = self.outbox.wake.fileno()
        poller.register(outbox_fd, zmq.POLLIN)  # the poller reports plain fds by number
        signals_fd = None if self._signals is None else self._signals.fileno()
        if signals_fd is not None:
            poller.register(signals_fd, zmq.POLLIN)
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
            if self.engine.state is EngineState.FAILED:  # before the stop check: a failed load is not a drain
                raise StartupError(self.engine.load_error or "model loading failed")
            if signals_fd is not None and signals_fd in events:
                self._check_signals()
            if self._stop.is_set() and deadline is None:  # before reading requests: they get shutting_down
                log.info("draining (at most %g s)", self.drain_timeout_s)
                self.notifier.stopping()
                self.engine.drain()
                deadline = time.monotonic() + self.drain_timeout_s
            self.engine.expire()
            if outbox_fd in events:
                self._send_finished(router)
            if router in events:
                self._receive_requests(router)
            if deadline is not None and self._in_flight == 0 and not events:
                return 0
            if deadline is not None and time.monotonic() > deadline:
                self._abort_and_flush(router)
                return 0

    def _abort_and_flush(self, router: zmq.Socket) -> None:
        """The drain deadline passed: every admitted request still unanswered gets `shutting_down`,
        and the replies already on their way are sent before the socket closes."""
        aborted = self.engine.abort_all(RequestError(
            ErrorCode.SHUTTING_DOWN, f"the daemon stopped before this request was done (drain timeout "
                                     f"{self.drain_timeout_s:g} s); retry on another instance"))
        self.engine.stop()  # nothing new starts: queued batches and preprocessing are dropped
        log.warning("drain timeout: %d unfinished request(s) answered shutting_down", aborted)
        end = time.monotonic() + FLUSH_AFTER_ABORT_S
        while True:
            self._send_finished(router)
            if self._in_flight == 0 or time.monotonic() > end:
                break
            self.outbox.wake.wait(0.01)
        # Keep the socket open a moment: closing it right after these sends lost many of them over
        # tcp (even with a linger), and their clients waited their whole timeout instead of retrying.
        # Requests that come meanwhile are answered `shutting_down`, not left unread.
        end = time.monotonic() + CLOSE_GRACE_S
        while (left := end - time.monotonic()) > 0:
            if router.poll(max(1, int(left * 1000)), zmq.POLLIN):
                self._receive_requests(router)

    # -- replies ---------------------------------------------------------------------------------
    def _send_finished(self, router: zmq.Socket) -> None:
        """Send what the outbox holds: encoded replies as they are, finished jobs encoded here when
        their reply is small, else on the reply thread (which posts the bytes back)."""
        for item in self.outbox.take():
            if isinstance(item, Finished) and isinstance(item.outcome, JobResult) \
                    and not item.handler.small_reply(item.request, item.job):
                try:
                    self._encoder.submit(self._encode_to_outbox, item)
                    continue
                except RuntimeError:  # the reply thread is shut down (stopping): encode it here
                    pass
            data = item.data if isinstance(item, Encoded) else self._encode(item)
            router.send_multipart([*item.envelope, data])
            self._in_flight -= 1

    def _encode_to_outbox(self, item: Finished) -> None:
        """On the reply thread: encode, and hand the bytes back to the socket loop."""
        self.outbox.post(Encoded(item.envelope, self._encode(item)))

    def _encode(self, item: Finished) -> bytes:
        """A finished job's reply: the handler's reply encoded, or its error."""
        outcome, request_id = item.outcome, item.request.id
        if isinstance(outcome, RequestError):
            return self._error(request_id, outcome)
        try:
            data = encode_reply(request_id, item.handler.finish(item.request, item.job, outcome))
        except RequestError as exc:
            return self._error(request_id, exc)
        except Exception as exc:  # a bug in one reply fails that request only
            return self._internal(request_id, exc, "encoding a reply failed")
        self.metrics.done(item.handler.op, outcome.elapsed_s, item.job.size, outcome.tokens)
        return data

    def _error(self, request_id: Any, error: RequestError) -> bytes:
        self.metrics.error(error.code.value)
        return encode_error(request_id, error)

    def _internal(self, request_id: Any, exc: Exception, what: str) -> bytes:
        self.tracebacks.log(log, what)
        error = internal_error(exc)
        return self._error(request_id if _packable(request_id) else None, error)

    # -- requests --------------------------------------------------------------------------------
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
        envelope = [f.bytes for f in frames]
        if b"" in envelope:
            envelope = envelope[:envelope.index(b"") + 1]
        elif envelope:
            envelope = envelope[:1]
        data = self._error(None, error)
        return [*envelope, data] if envelope else None

    def _handle(self, frames: list) -> list[bytes] | None:
        """Decode one message and hand it to its op's handler; returns an immediate reply, or None
        when a job was admitted (its reply comes through the outbox)."""
        if len(frames) < 2:
            return None  # no payload after the routing id: nothing to answer
        envelope, data = [f.bytes for f in frames[:-1]], frames[-1].buffer
        request_id = None
        try:
            payload = decode_payload(data, self.config.limits)
            request_id = payload.get("id")
            self.metrics.request(payload["op"] if payload.get("op") in OPS else "other")
            request = parse_request(payload, self.config.limits, self.config.media)
            handler = self.handlers[request.op]
            started = handler.start(request)
            if not isinstance(started, Job):
                return [*envelope, encode_reply(request.id, started)]
            self._submit(envelope, handler, request, started)
            return None
        except RequestError as exc:
            return [*envelope, self._error(request_id, exc)]
        except Exception as exc:  # a bug in handling one message must not stop the socket loop
            return [*envelope, self._internal(request_id, exc, "handling a message failed")]

    def _submit(self, envelope: list, handler: Handler, request: Request, job: Job) -> None:
        def done(outcome: JobResult | RequestError) -> None:  # on whichever thread finished the job
            self.outbox.post(Finished(envelope, handler, request, job, outcome))

        self._in_flight += 1
        try:
            self.engine.submit(job, done)
        except BaseException:
            self._in_flight -= 1
            raise
