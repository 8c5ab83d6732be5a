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
from dataclasses import dataclass
from typing import Any, Callable

import zmq
import zmq.asyncio

from .config import client_endpoint
from .discovery import Discovery, Resolver, is_ipv6
from .protocol import (DaemonError, EmbedReply, ErrorCode, ModelMismatch, RerankReply, UnknownModel, checked,
                       decode_reply, embed_request, health_request, pack, refuses_priority, rerank_request,
                       with_deadline, without_priority)

__all__ = ["Client", "AsyncClient", "CurveKeys", "DaemonError", "DaemonTimeout", "DaemonUnavailable",
           "ModelMismatch", "UnknownModel", "EmbedResult", "RerankResult", "split_endpoints"]

RETRY_ELSEWHERE = (ErrorCode.SHUTTING_DOWN.value,)  # error codes that another daemon may not give
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


def _configure(sock: zmq.Socket, endpoint: str, curve: CurveKeys | None) -> zmq.Socket:
    sock.linger = 0
    # Queue only to a connected daemon, so that a request never waits on one that is down.
    sock.immediate = 1
    sock.reconnect_ivl = 100
    sock.reconnect_ivl_max = 1000
    if is_ipv6(endpoint):
        sock.ipv6 = 1
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.client_public
        sock.curve_secretkey = curve.client_secret
    sock.connect(endpoint)
    return sock


def _connected(sock: zmq.Socket) -> bool:
    """Whether a message could be queued to a connected daemon now (ZMQ_IMMEDIATE: only then)."""
    try:
        return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)
    except zmq.ZMQError:
        return False


class DaemonTimeout(TimeoutError):
    """No reply in time. The client has reset its socket and is usable again."""


class DaemonUnavailable(ConnectionError):
    """No daemon is connected on any endpoint (not started, or restarting)."""


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


class Failover:
    """One request's tries over the daemons it found: each once at most, within the request's own
    time. The turn picks among the daemons connected now, round robin (so a daemon that died is
    skipped at once while another is up, not waited on for the connect timeout, and the live ones
    share its turns evenly, bursts included); the others come after. A try that finds no daemon
    connected, times out, or is answered by a draining daemon moves on to the next; the last
    failure is the answer."""

    def __init__(self, rotation: Rotation, daemons: int, timeout: float, clock: Callable[[], float],
                 connected: Callable[[int], bool] | None = None):
        self.daemons, self._rotation, self._clock = daemons, rotation, clock
        self._deadline = clock() + timeout
        self._connected = connected
        self._failure: Exception | dict | None = None  # an exception, or a draining reply

    def order(self) -> list[int]:
        turn = self._rotation.take()
        live = [i for i in range(self.daemons) if self._connected is None or self._connected(i)]
        if not live or len(live) == self.daemons:
            return [(turn + k) % self.daemons for k in range(self.daemons)]
        first = turn % len(live)
        return live[first:] + live[:first] + [i for i in range(self.daemons) if i not in live]

    def tries(self):
        """(daemon index, seconds left) for each try; the caller reports each outcome."""
        for index in self.order():
            remaining = self._deadline - self._clock()
            if remaining <= 0:
                return
            yield index, remaining

    def failed(self, exc: Exception) -> None:
        self._failure = exc

    def accept(self, reply: dict) -> bool:
        """Whether `reply` is the answer (else the next daemon is tried)."""
        if self.daemons > 1 and (reply.get("error") or {}).get("code") in RETRY_ELSEWHERE:
            self._failure = reply
            return False
        return True

    def give_up(self, endpoint: str) -> dict:
        if isinstance(self._failure, dict):
            return self._failure
        raise self._failure or DaemonTimeout(f"no reply from {endpoint} in time")


def _discovery(endpoint: str | list[str] | None, resolver: Resolver | None,
               dns_refresh_s: float | None) -> Discovery:
    return Discovery(split_endpoints(endpoint), resolver, dns_refresh_s)


class Client:
    """A blocking client, safe to share between threads (one request on the wire at a time).

    On a timeout the socket is closed and reopened (the ZeroMQ guide's lazy pirate pattern), so a
    late reply can never be mistaken for the answer to the next request.
    """

    def __init__(self, endpoint: str | list[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None, connect_timeout: float = 1.0, curve: CurveKeys | None = None,
                 resolver: Resolver | None = None, dns_refresh_s: float | None = None):
        self._discovery = _discovery(endpoint, resolver, dns_refresh_s)
        self.endpoints = self._discovery.configured
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._socks: dict[str, zmq.Socket] = {}
        self._order: list[str] = []
        self._version = -1
        self._rotation = Rotation()
        self._sync(0)  # connect now: the first request then finds its daemons connected

    def daemons(self) -> list[str]:
        """The endpoints requests go to now (a DNS name's addresses as last looked up)."""
        return self._discovery.current()[1]

    def _open(self, endpoint: str) -> zmq.Socket:
        return _configure(self._ctx.socket(zmq.DEALER), endpoint, self.curve)

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
        for endpoint in endpoints:
            if endpoint not in self._socks:
                self._socks[endpoint] = self._open(endpoint)
        self._order, self._version = endpoints, version

    def request(self, payload: dict, timeout: float | None = None) -> dict:
        """Send one payload and return the reply map (errors are in it, not raised)."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            self._sync(min(self.connect_timeout, timeout))
            if not self._order:
                raise DaemonUnavailable(f"{self.endpoint}: {self._discovery.describe_empty()}")
            plan = Failover(self._rotation, len(self._order), timeout, time.monotonic,
                            lambda i: _connected(self._socks[self._order[i]]))
            for index, remaining in plan.tries():
                try:
                    reply = self._request_on(self._order[index], payload, remaining)
                    if refuses_priority(payload, reply):  # a daemon from before priorities
                        reply = self._request_on(self._order[index], without_priority(payload), remaining)
                except (DaemonUnavailable, DaemonTimeout) as exc:
                    plan.failed(exc)
                    continue
                if plan.accept(reply):
                    return reply
            return plan.give_up(self.endpoint)

    def _request_on(self, endpoint: str, payload: dict, timeout: float) -> dict:
        sock = self._socks[endpoint]
        if not sock.poll(int(min(self.connect_timeout, timeout) * 1000), zmq.POLLOUT):
            raise DaemonUnavailable(f"no daemon is connected on {endpoint}")
        request_id = next(self._ids)
        sock.send_multipart(_message(request_id, payload, timeout))
        end = time.monotonic() + timeout
        while sock.poll(max(0, int((end - time.monotonic()) * 1000))):
            frames = sock.recv_multipart()
            if frames[0] == _tag(request_id):
                return decode_reply(frames[-1])
        sock.close(linger=0)
        self._socks[endpoint] = self._open(endpoint)
        raise DaemonTimeout(f"no reply from {endpoint} within {timeout:g}s")

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
    """One daemon of an AsyncClient: its socket, the task reading its replies, its requests on the wire."""

    sock: zmq.asyncio.Socket
    reader: asyncio.Task
    in_flight: int = 0
    retired: bool = False  # gone from the set: closed once its requests on the wire are answered

    def close(self) -> None:
        self.reader.cancel()
        self.sock.close(linger=0)


class AsyncClient:
    """An asyncio client: any number of requests in flight, one DEALER socket per daemon, replies
    matched by an echoed tag frame.

    Requests are only queued to a connected daemon (ZMQ_IMMEDIATE): while none is connected, a
    request waits up to `connect_timeout` per daemon and then fails with DaemonUnavailable instead of
    being delivered long after its caller gave up. ZeroMQ reconnects by itself when a daemon is back.
    A daemon that leaves a DNS name's set gets no new requests; its socket is closed once the ones it
    holds are answered (a draining pod still answers them).
    """

    def __init__(self, endpoint: str | list[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = 1.0, curve: CurveKeys | None = None,
                 resolver: Resolver | None = None, dns_refresh_s: float | None = None):
        self._discovery = _discovery(endpoint, resolver, dns_refresh_s)
        self.endpoints = self._discovery.configured
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.curve = curve
        self._ctx = zmq.asyncio.Context.instance()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._peers: dict[str, _Peer] = {}
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
                sock = _configure(self._ctx.socket(zmq.DEALER), endpoint, self.curve)
                self._peers[endpoint] = _Peer(sock, loop.create_task(self._read(sock)))
            else:
                peer.retired = False
        for endpoint in set(self._peers) - set(endpoints):
            self._peers[endpoint].retired = True
            self._close_if_idle(endpoint)

    def _close_if_idle(self, endpoint: str) -> None:
        peer = self._peers.get(endpoint)
        if peer is not None and peer.retired and peer.in_flight == 0:
            del self._peers[endpoint]
            peer.close()

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            future = self._pending.pop(int.from_bytes(frames[0], "big"), None) if len(frames) == 3 else None
            if future is not None and not future.done():
                try:
                    future.set_result(decode_reply(frames[-1]))
                except Exception as exc:  # a reply we cannot read fails only its own request
                    future.set_exception(exc)

    async def request(self, payload: dict, timeout: float | None = None) -> dict:
        timeout = self.timeout if timeout is None else timeout
        clock = asyncio.get_running_loop().time
        started = clock()
        await self._sync(min(self.connect_timeout, timeout))
        order = self._order
        if not order:
            raise DaemonUnavailable(f"{self.endpoint}: {self._discovery.describe_empty()}")
        plan = Failover(self._rotation, len(order), timeout - (clock() - started), clock,
                        lambda i: order[i] in self._peers and _connected(self._peers[order[i]].sock))
        for index, remaining in plan.tries():
            try:
                reply = await self._request_on(order[index], payload, remaining)
                if refuses_priority(payload, reply):  # a daemon from before priorities
                    reply = await self._request_on(order[index], without_priority(payload), remaining)
            except (DaemonUnavailable, DaemonTimeout) as exc:
                plan.failed(exc)
                continue
            if plan.accept(reply):
                return reply
        return plan.give_up(self.endpoint)

    async def _request_on(self, endpoint: str, payload: dict, timeout: float) -> dict:
        peer = self._peers.get(endpoint)
        if peer is None:  # closed meanwhile (left the set and idle)
            raise DaemonUnavailable(f"{endpoint} is no longer among the daemons")
        peer.in_flight += 1
        try:
            return await self._exchange(peer.sock, endpoint, payload, timeout)
        finally:
            peer.in_flight -= 1
            self._close_if_idle(endpoint)

    async def _exchange(self, sock: zmq.asyncio.Socket, endpoint: str, payload: dict, timeout: float) -> dict:
        if not await sock.poll(int(min(self.connect_timeout, timeout) * 1000), zmq.POLLOUT):
            raise DaemonUnavailable(f"no daemon is connected on {endpoint}")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await sock.send_multipart(_message(request_id, payload, timeout))
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DaemonTimeout(f"no reply from {endpoint} within {timeout:g}s") from None
        finally:
            self._pending.pop(request_id, None)

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
        self._discovery.close()
        for peer in self._peers.values():
            peer.close()
        self._peers, self._order, self._version = {}, [], -1

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
