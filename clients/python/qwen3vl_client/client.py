"""Python clients for the daemon: `Client` (blocking, thread-safe) and `AsyncClient` (asyncio, many
requests in flight on one socket per daemon). Both speak PROTOCOL.md over DEALER sockets.

Both take one endpoint or several (a list, or one string with commas): requests go round-robin over
the daemons, and a request whose daemon is not connected, times out, or is draining is retried on the
next one (every op is idempotent), within the request's own timeout. A `dns+tcp://HOST:PORT` entry
stands for every address of HOST, looked up again every $QWEN3VL_DNS_REFRESH seconds (discovery.py).
tcp:// endpoints (and those a DNS name gives) may use ZeroMQ's CURVE encryption and authentication
(`CurveKeys`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq
import zmq.asyncio

from .discovery import Discovery, Resolver, is_ipv6
from .endpoints import client_endpoint
from .limits import SizeGuard
from .liveness import (CHECK_S, DaemonLost, DaemonUnavailable, Heartbeat, MAX_RESENDS,
                                     checked_heartbeat, checked_timeout, writable)
from .protocol import (DaemonError, EmbedReply, ErrorCode, ModelMismatch, RerankReply, UnknownModel,
                                     checked, decode_reply, embed_request, health_request, pack, refuses_priority,
                                     rerank_request, with_deadline, without_priority)

__all__ = ["Client", "AsyncClient", "CurveKeys", "DaemonError", "DaemonTimeout", "DaemonUnavailable",
           "ModelMismatch", "UnknownModel", "EmbedResult", "RerankResult", "split_endpoints"]

RETRY_ELSEWHERE = (ErrorCode.SHUTTING_DOWN.value,)  # error codes that another daemon may not give
STARTING_PAUSE_S = 0.25  # between tries of a lost request on a daemon that is back but still loading
DEFAULT_TIMEOUT_S = 60.0  # a request's whole time, retries on other daemons included

# What the client's methods return: the protocol's reply types.
EmbedResult = EmbedReply
RerankResult = RerankReply


def split_endpoints(endpoint: str | list[str] | None) -> list[str]:
    if endpoint is None:
        endpoint = client_endpoint()
    parts = endpoint.split(",") if isinstance(endpoint, str) else list(endpoint)
    endpoints = [p.strip() for p in parts if p.strip()]
    if not endpoints:
        raise ValueError("no endpoint given")
    return endpoints


@dataclass(frozen=True)
class CurveKeys:
    """A client's CURVE keys and the server's public key (z85, as zmq.auth writes them)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_public_file: str, client_secret_file: str) -> "CurveKeys":
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(server_public_file)
        client_public, client_secret = zmq.auth.load_certificate(client_secret_file)
        if client_secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key")
        return cls(server_public, client_public, client_secret)


def _configure(sock: zmq.Socket, endpoint: str, curve: CurveKeys | None, heartbeat: Heartbeat) -> zmq.Socket:
    """Set a new DEALER up for one daemon and connect it."""
    sock.linger = 0
    # Queue only to a connected daemon, so that a request never waits on one that is down; and no
    # send limit, so that the socket stops taking messages only when its daemon is gone (liveness.py).
    sock.immediate = 1
    sock.sndhwm = 0
    sock.reconnect_ivl = 100
    sock.reconnect_ivl_max = 1000
    heartbeat.apply(sock)
    if is_ipv6(endpoint):
        sock.ipv6 = 1
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.client_public
        sock.curve_secretkey = curve.client_secret
    sock.connect(endpoint)
    return sock


def _send_now(sock: zmq.Socket, frames: list[bytes], endpoint: str) -> None:
    """Queue a request on a connected socket; DaemonLost if its connection ended a moment ago. (An
    asyncio socket gives a future, done at once for a non-blocking send: its error is raised here.)"""
    try:
        sent = sock.send_multipart(frames, zmq.NOBLOCK)
        if isinstance(sent, asyncio.Future) and sent.done():
            sent.result()
    except zmq.Again:
        raise DaemonLost(f"the daemon at {endpoint} was lost (its connection ended) as the request went") from None


class ClientClosed(DaemonUnavailable):
    """The client was closed while the request waited: it is not sent again."""


class DaemonTimeout(TimeoutError):
    """No reply in time. The client has reset its socket and is usable again."""


def _tag(request_id: int) -> bytes:
    """A routing frame before the delimiter: the daemon echoes it, so a reply is matched to its
    request even when the daemon could not read the payload's id (an oversized or corrupt payload)."""
    return request_id.to_bytes(8, "big")


def _message(request_id: int, payload: dict, timeout: float) -> list[bytes]:
    return [_tag(request_id), b"", pack({**with_deadline(payload, timeout), "id": request_id})]


class Rotation:
    """Round robin over the daemons, shared by every request of one client (the set may change)."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> int:
        turn, self._next = self._next, self._next + 1
        return turn


@dataclass(frozen=True)
class Try:
    """One try of a request: the daemons it may go to (the first connected of them takes it), the
    request's time left, and how long to wait for one of them to be connected."""

    candidates: list[int]
    remaining: float
    connect_wait: float
    pause_s: float = 0.0  # to wait first: the daemon that took the last try is still starting


class Failover:
    """One request's tries over the daemons it found, within the request's own time.

    First each daemon once at most. The turn picks among the daemons connected now, round robin (so
    a daemon that died is skipped at once while another is up, and the live ones share its turns
    evenly, bursts included); the others come after. A try that finds no daemon connected (within
    the connect timeout), times out, or is answered by a draining daemon moves on to the next.

    A try whose daemon is lost under it (DaemonLost: the connection ended before the answer) is
    sent again at once to whichever daemon is connected first, the same one back from a restart
    included, waiting for one as long as the request's time allows; at most MAX_RESENDS times.
    The last failure is the answer."""

    def __init__(self, rotation: Rotation, daemons: int, timeout: float, clock: Callable[[], float],
                 connected: Callable[[int], bool] | None = None, connect_timeout: float = 1.0):
        self.daemons, self._rotation, self._clock = daemons, rotation, clock
        self._deadline = clock() + timeout
        self._connected = connected
        self._connect_timeout = connect_timeout
        self._failure: Exception | dict | None = None  # an exception, or a draining reply
        self._lost: list[str] = []  # the endpoints lost under this request, in order
        self._refused: set[int] = set()  # daemons that answered "draining"
        self._starting = False  # the last try's daemon answered that it is still loading

    def order(self) -> list[int]:
        turn = self._rotation.take()
        live = [i for i in range(self.daemons) if self._connected is None or self._connected(i)]
        if not live or len(live) == self.daemons:
            return [(turn + k) % self.daemons for k in range(self.daemons)]
        first = turn % len(live)
        return live[first:] + live[:first] + [i for i in range(self.daemons) if i not in live]

    def tries(self):
        """Each Try in turn; the caller reports each outcome (failed, accept)."""
        for index in self.order():
            if self._lost:
                break
            remaining = self._deadline - self._clock()
            if remaining <= 0:
                return
            yield Try([index], remaining, min(self._connect_timeout, remaining))
        while True:  # each pass ends in a loss, a refusal, a starting daemon's pause or the deadline
            candidates = [i for i in range(self.daemons) if i not in self._refused]
            remaining = self._deadline - self._clock() - (STARTING_PAUSE_S if self._starting else 0.0)
            if not self._lost or len(self._lost) > MAX_RESENDS or not candidates or remaining <= 0:
                return
            seen = (len(self._lost), len(self._refused))
            yield Try(candidates, remaining, remaining, STARTING_PAUSE_S if self._starting else 0.0)
            if (len(self._lost), len(self._refused)) == seen and not self._starting:
                return  # it failed otherwise (no daemon came back in time): that failure is the answer

    def failed(self, exc: Exception, endpoint: str) -> None:
        if isinstance(exc, DaemonLost):
            self._lost.append(endpoint)
        self._failure = exc

    def accept(self, index: int, reply: dict) -> bool:
        """Whether `reply` is the answer (else the next daemon is tried)."""
        error = reply.get("error") or {}
        self._starting = False
        if self.daemons > 1 and error.get("code") in RETRY_ELSEWHERE:
            self._failure = reply
            self._refused.add(index)
            return False
        if self._lost and error.get("code") == ErrorCode.NOT_LOADED.value and error.get("status") == "loading":
            # The daemon back from a restart, still loading: the request it lost waits for it.
            self._failure, self._starting = reply, True
            return False
        return True

    def give_up(self, endpoint: str) -> dict:
        lost = ", ".join(dict.fromkeys(self._lost))
        if self._starting:
            raise DaemonUnavailable(f"the daemon at {lost} was lost with the request on it, and is back but "
                                    "still loading its models")
        if isinstance(self._failure, dict):
            return self._failure
        if self._lost and not isinstance(self._failure, DaemonTimeout):
            if len(self._lost) > MAX_RESENDS:
                raise DaemonUnavailable(f"the daemon was lost with the request on it {len(self._lost)} times "
                                        f"({lost}); not sent again: it may be what ends them")
            raise DaemonUnavailable(f"the daemon at {lost} was lost with the request on it, and no daemon "
                                    "was connected again within the request's time") from self._failure
        raise self._failure or DaemonTimeout(f"no reply from {endpoint} in time")


def _discovery(endpoint: str | list[str] | None, resolver: Resolver | None,
               dns_refresh_s: float | None) -> Discovery:
    return Discovery(split_endpoints(endpoint), resolver, dns_refresh_s)


class Client:
    """A blocking client, safe to share between threads (one request on the wire at a time).

    On a timeout the socket is closed and reopened (the ZeroMQ guide's lazy pirate pattern), so a
    late reply can never be mistaken for the answer to the next request. A daemon lost with the
    request on it (liveness.py) costs a resend, not the timeout.
    """

    def __init__(self, endpoint: str | list[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None, connect_timeout: float = 1.0, curve: CurveKeys | None = None,
                 resolver: Resolver | None = None, dns_refresh_s: float | None = None,
                 heartbeat: Heartbeat | None = None):
        self._discovery = _discovery(endpoint, resolver, dns_refresh_s)
        self.endpoints = self._discovery.configured
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.curve = curve
        self.heartbeat = checked_heartbeat(heartbeat)
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._socks: dict[str, zmq.Socket] = {}
        self._sizes = SizeGuard()
        self._order: list[str] = []
        self._version = -1
        self._rotation = Rotation()
        self._sync(0)  # connect now: the first request then finds its daemons connected

    def daemons(self) -> list[str]:
        """The endpoints requests go to now (a DNS name's addresses as last looked up)."""
        return self._discovery.current()[1]

    def _open(self, endpoint: str) -> zmq.Socket:
        return _configure(self._ctx.socket(zmq.DEALER), endpoint, self.curve, self.heartbeat)

    def _sync(self, wait_s: float) -> None:
        """Follow the daemon set: sockets for new endpoints, gone ones closed (no request is on the
        wire here: requests take the lock)."""
        if self._discovery.names and not self._order:
            self._discovery.wait_first(wait_s)
        version, endpoints = self._discovery.current()
        if version == self._version:
            return
        for gone in set(self._socks) - set(endpoints):
            self._socks.pop(gone).close(linger=0)
            self._sizes.forget(gone)
        for endpoint in endpoints:
            if endpoint not in self._socks:
                self._socks[endpoint] = self._open(endpoint)
        self._order, self._version = endpoints, version

    def request(self, payload: dict, timeout: float | None = None) -> dict:
        """Send one payload and return the reply map (errors are in it, not raised)."""
        timeout = checked_timeout(self.timeout if timeout is None else timeout)
        deadline = time.monotonic() + timeout
        # The time waited for another thread's request counts: the caller's timeout is the whole.
        if not self._lock.acquire(timeout=timeout):
            raise DaemonTimeout(f"no reply from {self.endpoint} within {timeout:g}s (this client's other "
                                "requests held it)")
        try:
            self._sync(min(self.connect_timeout, timeout))
            if not self._order:
                raise DaemonUnavailable(f"{self.endpoint}: {self._discovery.describe_empty()}")
            order = self._order
            plan = Failover(self._rotation, len(order), deadline - time.monotonic(), time.monotonic,
                            lambda i: writable(self._socks[order[i]]), self.connect_timeout)
            for attempt in plan.tries():
                time.sleep(attempt.pause_s)
                endpoint = self._first_connected([order[i] for i in attempt.candidates], attempt.connect_wait)
                try:
                    if endpoint is None:
                        raise DaemonUnavailable(f"no daemon is connected on {', '.join(order[i] for i in attempt.candidates)}")
                    reply = self._request_on(endpoint, payload, deadline)
                    if refuses_priority(payload, reply):  # a daemon from before priorities
                        reply = self._request_on(endpoint, without_priority(payload), deadline)
                except (DaemonUnavailable, DaemonTimeout) as exc:
                    plan.failed(exc, endpoint or "")
                    continue
                if plan.accept(order.index(endpoint), reply):
                    return reply
            return plan.give_up(self.endpoint)
        finally:
            self._lock.release()

    def _first_connected(self, endpoints: list[str], wait_s: float) -> str | None:
        """The first of `endpoints` whose daemon is connected, waiting up to `wait_s` for one."""
        poller = zmq.Poller()
        for endpoint in endpoints:
            poller.register(self._socks[endpoint], zmq.POLLOUT)
        ready = dict(poller.poll(max(0, int(wait_s * 1000))))
        return next((e for e in endpoints if ready.get(self._socks[e], 0) & zmq.POLLOUT), None)

    def _request_on(self, endpoint: str, payload: dict, deadline: float) -> dict:
        """One round trip to a connected daemon: its reply; DaemonLost when its connection ends first
        (it is then forgotten, and its socket reconnects by itself); DaemonTimeout at the deadline."""
        request_id, budget = next(self._ids), deadline - time.monotonic()
        frames = _message(request_id, payload, budget)
        if self._sizes.needs_limit(len(frames[-1])):
            self._request_on(endpoint, health_request(), deadline)  # learns the limit
        refusal = self._sizes.refusal(endpoint, len(frames[-1]))
        if refusal is not None:
            return refusal
        sock = self._socks[endpoint]
        _send_now(sock, frames, endpoint)
        while (left := deadline - time.monotonic()) > 0:
            if sock.poll(max(1, int(min(left, CHECK_S) * 1000))):
                frames = sock.recv_multipart()
                if frames[0] == _tag(request_id):
                    return self._sizes.noted(endpoint, payload, decode_reply(frames[-1]))
            elif not writable(sock):
                self._sizes.forget(endpoint)
                raise DaemonLost(f"the daemon at {endpoint} was lost (its connection ended) with the request on it")
        sock.close(linger=0)
        self._socks[endpoint] = self._open(endpoint)
        raise DaemonTimeout(f"no reply from {endpoint} within {budget:g}s")

    def embed(self, inputs: list, instruction: str | None = None, dimension: int | None = None,
              normalize: bool = True, timeout: float | None = None, encoding: str | None = None,
              expect_fingerprint: str | None = None, model: str | None = None,
              priority: str | None = None) -> EmbedResult:
        """Embeddings of `inputs`. `encoding` (float32 by default; int8, uint8, binary, ubinary) sets
        the array's type; `expect_fingerprint` refuses another model (ModelMismatch), or, without
        `model`, picks the served model of that fingerprint; `model` names one (UnknownModel if none).
        `priority`: "interactive" (the default: someone waits) or "batch" (bulk work, which yields to
        interactive requests)."""
        payload = embed_request(inputs, instruction, dimension, normalize, encoding, expect_fingerprint, model,
                                priority)
        return EmbedReply.from_wire(checked(self.request(payload, timeout)))

    def rerank(self, query: Any, documents: list, instruction: str | None = None,
               timeout: float | None = None, top_n: int | None = None,
               expect_fingerprint: str | None = None, model: str | None = None,
               priority: str | None = None) -> RerankResult:
        """Scores in document order; with `top_n`, also `top`: the best documents' indices. `model`,
        `expect_fingerprint` and `priority` as in `embed`."""
        payload = rerank_request(query, documents, instruction, top_n, expect_fingerprint, model, priority)
        return RerankReply.from_wire(checked(self.request(payload, timeout)))

    def health(self, timeout: float | None = None) -> dict:
        return checked(self.request(health_request(), timeout))

    def close(self) -> None:
        self._discovery.close()
        with self._lock:
            for sock in self._socks.values():
                sock.close(linger=0)
            self._socks, self._order, self._version = {}, [], -1

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Peer:
    """One daemon of an AsyncClient: its socket, the task reading its replies, its requests on the
    wire (by id), and the task watching its connection while any is."""

    sock: zmq.asyncio.Socket
    reader: asyncio.Task | None = None
    waiting: dict[int, asyncio.Future] = field(default_factory=dict)
    watcher: asyncio.Task | None = None
    in_flight: int = 0
    retired: bool = False  # gone from the set: closed once its requests on the wire are answered

    def close(self) -> None:
        for task in (self.reader, self.watcher):
            if task is not None:
                task.cancel()
        self.sock.close(linger=0)


class AsyncClient:
    """An asyncio client: any number of requests in flight, one DEALER socket per daemon, replies
    matched by an echoed tag frame.

    Requests are only queued to a connected daemon (ZMQ_IMMEDIATE): while none is connected, a
    request waits up to `connect_timeout` per daemon and then fails with DaemonUnavailable instead of
    being delivered long after its caller gave up. ZeroMQ reconnects by itself when a daemon is back.
    A daemon lost with requests on it (liveness.py) fails them over to another at once. A daemon that
    leaves a DNS name's set gets no new requests; its socket is closed once the ones it holds are
    answered (a draining pod still answers them).
    """

    def __init__(self, endpoint: str | list[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = 1.0, curve: CurveKeys | None = None,
                 resolver: Resolver | None = None, dns_refresh_s: float | None = None,
                 heartbeat: Heartbeat | None = None):
        self._discovery = _discovery(endpoint, resolver, dns_refresh_s)
        self.endpoints = self._discovery.configured
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.curve = curve
        self.heartbeat = checked_heartbeat(heartbeat)
        self._ctx = zmq.asyncio.Context.instance()
        self._ids = itertools.count(1)
        self._peers: dict[str, _Peer] = {}
        self._sizes = SizeGuard()
        self._order: list[str] = []
        self._version = -1
        self._rotation = Rotation()

    def daemons(self) -> list[str]:
        """The endpoints requests go to now (a DNS name's addresses as last looked up)."""
        return self._discovery.current()[1]

    async def _sync(self, wait_s: float) -> None:
        if self._discovery.names and not self._order:
            await asyncio.get_running_loop().run_in_executor(None, self._discovery.wait_first, wait_s)
        version, endpoints = self._discovery.current()
        if version == self._version:
            return
        self._order, self._version = endpoints, version  # first: no await below, no other request interleaves
        loop = asyncio.get_running_loop()
        for endpoint in endpoints:
            peer = self._peers.get(endpoint)
            if peer is None:
                peer = self._peers[endpoint] = _Peer(_configure(self._ctx.socket(zmq.DEALER), endpoint, self.curve,
                                                                self.heartbeat))
                peer.reader = loop.create_task(self._read(peer))
            else:
                peer.retired = False
        for endpoint in set(self._peers) - set(endpoints):
            self._peers[endpoint].retired = True
            self._close_if_idle(endpoint)

    def _close_if_idle(self, endpoint: str) -> None:
        peer = self._peers.get(endpoint)
        if peer is not None and peer.retired and peer.in_flight == 0:
            del self._peers[endpoint]
            self._sizes.forget(endpoint)
            peer.close()

    @staticmethod
    async def _read(peer: _Peer) -> None:
        """Hand each reply to the request waiting for it; a late one (its request was sent again
        elsewhere, or gave up) finds none and is dropped."""
        while True:
            frames = await peer.sock.recv_multipart()
            future = peer.waiting.pop(int.from_bytes(frames[0], "big"), None) if len(frames) == 3 else None
            if future is not None and not future.done():
                try:
                    future.set_result(decode_reply(frames[-1]))
                except Exception as exc:  # a reply we cannot read fails only its own request
                    future.set_exception(exc)

    async def _watch(self, endpoint: str, peer: _Peer) -> None:
        """While requests are on the wire: a connection that ended fails them all with DaemonLost."""
        while peer.waiting:
            await asyncio.sleep(CHECK_S)
            if peer.waiting and not writable(peer.sock):
                self._sizes.forget(endpoint)
                for future in peer.waiting.values():
                    if not future.done():
                        future.set_exception(DaemonLost(f"the daemon at {endpoint} was lost (its connection "
                                                        "ended) with the request on it"))
                peer.waiting.clear()
        peer.watcher = None

    async def request(self, payload: dict, timeout: float | None = None) -> dict:
        timeout = checked_timeout(self.timeout if timeout is None else timeout)
        clock = asyncio.get_running_loop().time
        deadline = clock() + timeout
        await self._sync(min(self.connect_timeout, timeout))
        order = self._order
        if not order:
            raise DaemonUnavailable(f"{self.endpoint}: {self._discovery.describe_empty()}")
        plan = Failover(self._rotation, len(order), deadline - clock(), clock,
                        lambda i: order[i] in self._peers and writable(self._peers[order[i]].sock),
                        self.connect_timeout)
        for attempt in plan.tries():
            await asyncio.sleep(attempt.pause_s)
            endpoint = await self._first_connected([order[i] for i in attempt.candidates], attempt.connect_wait)
            try:
                if endpoint is None:
                    raise DaemonUnavailable(f"no daemon is connected on {', '.join(order[i] for i in attempt.candidates)}")
                reply = await self._request_on(endpoint, payload, deadline)
                if refuses_priority(payload, reply):  # a daemon from before priorities
                    reply = await self._request_on(endpoint, without_priority(payload), deadline)
            except ClientClosed:
                raise
            except (DaemonUnavailable, DaemonTimeout) as exc:
                plan.failed(exc, endpoint or "")
                continue
            if plan.accept(order.index(endpoint), reply):
                return reply
        return plan.give_up(self.endpoint)

    async def _first_connected(self, endpoints: list[str], wait_s: float) -> str | None:
        """The first of `endpoints` whose daemon is connected, waiting up to `wait_s` for one.

        Looked at every CHECK_S, never polled for POLLOUT: pyzmq's asyncio poll leaves a send event
        queued on the socket, and a send queued behind it waits for an edge that may never come."""
        clock = asyncio.get_running_loop().time
        end = clock() + wait_s
        while True:
            for endpoint in endpoints:
                peer = self._peers.get(endpoint)
                if peer is not None and writable(peer.sock):
                    return endpoint
            if clock() >= end:
                return None
            await asyncio.sleep(min(CHECK_S, max(0.0, end - clock())))

    async def _request_on(self, endpoint: str, payload: dict, deadline: float) -> dict:
        peer = self._peers.get(endpoint)
        if peer is None:  # closed meanwhile (left the set and idle)
            raise DaemonUnavailable(f"{endpoint} is no longer among the daemons")
        peer.in_flight += 1
        try:
            return await self._exchange(endpoint, peer, payload, deadline)
        finally:
            peer.in_flight -= 1
            self._close_if_idle(endpoint)

    async def _exchange(self, endpoint: str, peer: _Peer, payload: dict, deadline: float) -> dict:
        loop = asyncio.get_running_loop()
        request_id, budget = next(self._ids), deadline - loop.time()
        frames = _message(request_id, payload, budget)
        if self._sizes.needs_limit(len(frames[-1])):
            await self._exchange(endpoint, peer, health_request(), deadline)  # learns the limit
        refusal = self._sizes.refusal(endpoint, len(frames[-1]))
        if refusal is not None:
            return refusal
        future = peer.waiting[request_id] = loop.create_future()
        try:
            _send_now(peer.sock, frames, endpoint)
            if peer.watcher is None:
                peer.watcher = loop.create_task(self._watch(endpoint, peer))
            reply = await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
            return self._sizes.noted(endpoint, payload, reply)
        except asyncio.TimeoutError:
            raise DaemonTimeout(f"no reply from {endpoint} within {budget:g}s") from None
        finally:
            peer.waiting.pop(request_id, None)

    async def embed(self, inputs: list, instruction: str | None = None, dimension: int | None = None,
                    normalize: bool = True, timeout: float | None = None, encoding: str | None = None,
                    expect_fingerprint: str | None = None, model: str | None = None,
                    priority: str | None = None) -> EmbedResult:
        payload = embed_request(inputs, instruction, dimension, normalize, encoding, expect_fingerprint, model,
                                priority)
        return EmbedReply.from_wire(checked(await self.request(payload, timeout)))

    async def rerank(self, query: Any, documents: list, instruction: str | None = None,
                     timeout: float | None = None, top_n: int | None = None,
                     expect_fingerprint: str | None = None, model: str | None = None,
                     priority: str | None = None) -> RerankResult:
        payload = rerank_request(query, documents, instruction, top_n, expect_fingerprint, model, priority)
        return RerankReply.from_wire(checked(await self.request(payload, timeout)))

    async def health(self, timeout: float | None = None) -> dict:
        return checked(await self.request(health_request(), timeout))

    async def close(self) -> None:
        """Close every socket; requests still waiting fail at once with DaemonUnavailable."""
        self._discovery.close()
        for endpoint, peer in self._peers.items():
            for future in peer.waiting.values():
                if not future.done():
                    future.set_exception(ClientClosed(f"the client was closed with the request to {endpoint} "
                                                      "on the wire"))
            peer.waiting.clear()
            peer.close()
        self._peers, self._order, self._version = {}, [], -1

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
