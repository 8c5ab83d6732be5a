"""Python clients for the daemon: `Client` (blocking, thread-safe) and `AsyncClient` (asyncio, many
requests in flight on one socket per daemon). Both speak PROTOCOL.md over DEALER sockets.

Both take one endpoint or several (a list, or one string with commas): requests go round-robin over
the daemons, and a request whose daemon is not connected, times out, or is draining is retried on the
next one (every op is idempotent), within the request's own timeout. tcp:// endpoints may use
ZeroMQ's CURVE encryption and authentication (`CurveKeys`).
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
from .protocol import (DaemonError, EmbedReply, ErrorCode, ModelMismatch, RerankReply, UnknownModel, checked,
                       decode_reply, embed_request, health_request, pack, rerank_request, with_deadline)

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
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.client_public
        sock.curve_secretkey = curve.client_secret
    sock.connect(endpoint)
    return sock


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
    """Round robin over the daemons, shared by every request of one client."""

    def __init__(self, daemons: int):
        self.daemons = daemons
        self._next = 0

    def take(self) -> int:
        index, self._next = self._next, (self._next + 1) % self.daemons
        return index


class Failover:
    """One request's tries over the daemons: each daemon once at most, in the client's round robin,
    within the request's own time. A try that finds no daemon connected, times out, or is answered by
    a draining daemon moves on to the next; the last failure is the answer."""

    def __init__(self, rotation: Rotation, timeout: float, clock: Callable[[], float]):
        self.daemons, self._rotation, self._clock = rotation.daemons, rotation, clock
        self._deadline = clock() + timeout
        self._failure: Exception | dict | None = None  # an exception, or a draining reply

    def tries(self):
        """(daemon index, seconds left) for each try; the caller reports each outcome."""
        for _ in range(self.daemons):
            index = self._rotation.take()
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


class Client:
    """A blocking client, safe to share between threads (one request on the wire at a time).

    On a timeout the socket is closed and reopened (the ZeroMQ guide's lazy pirate pattern), so a
    late reply can never be mistaken for the answer to the next request.
    """

    def __init__(self, endpoint: str | list[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None, connect_timeout: float = 1.0, curve: CurveKeys | None = None):
        self.endpoints = split_endpoints(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._socks = [self._open(ep) for ep in self.endpoints]
        self._rotation = Rotation(len(self.endpoints))

    def _open(self, endpoint: str) -> zmq.Socket:
        return _configure(self._ctx.socket(zmq.DEALER), endpoint, self.curve)

    def request(self, payload: dict, timeout: float | None = None) -> dict:
        """Send one payload and return the reply map (errors are in it, not raised)."""
        with self._lock:
            plan = Failover(self._rotation, self.timeout if timeout is None else timeout, time.monotonic)
            for index, remaining in plan.tries():
                try:
                    reply = self._request_on(index, payload, remaining)
                except (DaemonUnavailable, DaemonTimeout) as exc:
                    plan.failed(exc)
                    continue
                if plan.accept(reply):
                    return reply
            return plan.give_up(self.endpoint)

    def _request_on(self, index: int, payload: dict, timeout: float) -> dict:
        sock, endpoint = self._socks[index], self.endpoints[index]
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
        self._socks[index] = self._open(endpoint)
        raise DaemonTimeout(f"no reply from {endpoint} within {timeout:g}s")

    def embed(self, inputs: list, instruction: str | None = None, dimension: int | None = None,
              normalize: bool = True, timeout: float | None = None, encoding: str | None = None,
              expect_fingerprint: str | None = None, model: str | None = None) -> EmbedResult:
        """Embeddings of `inputs`. `encoding` (float32 by default; int8, uint8, binary, ubinary) sets
        the array's type; `expect_fingerprint` refuses another model (ModelMismatch), or, without
        `model`, picks the served model of that fingerprint; `model` names one (UnknownModel if none)."""
        payload = embed_request(inputs, instruction, dimension, normalize, encoding, expect_fingerprint, model)
        return EmbedReply.from_wire(checked(self.request(payload, timeout)))

    def rerank(self, query: Any, documents: list, instruction: str | None = None,
               timeout: float | None = None, top_n: int | None = None,
               expect_fingerprint: str | None = None, model: str | None = None) -> RerankResult:
        """Scores in document order; with `top_n`, also `top`: the best documents' indices. `model`
        and `expect_fingerprint` choose the reranker as in `embed`."""
        payload = rerank_request(query, documents, instruction, top_n, expect_fingerprint, model)
        return RerankReply.from_wire(checked(self.request(payload, timeout)))

    def health(self, timeout: float | None = None) -> dict:
        return checked(self.request(health_request(), timeout))

    def close(self) -> None:
        for sock in self._socks:
            sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """An asyncio client: any number of requests in flight, one DEALER socket per daemon, replies
    matched by an echoed tag frame.

    Requests are only queued to a connected daemon (ZMQ_IMMEDIATE): while none is connected, a
    request waits up to `connect_timeout` per daemon and then fails with DaemonUnavailable instead of
    being delivered long after its caller gave up. ZeroMQ reconnects by itself when a daemon is back.
    """

    def __init__(self, endpoint: str | list[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = 1.0, curve: CurveKeys | None = None):
        self.endpoints = split_endpoints(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.curve = curve
        self._ctx = zmq.asyncio.Context.instance()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._socks: list[zmq.asyncio.Socket] = []
        self._readers: list[asyncio.Task] = []
        self._rotation = Rotation(len(self.endpoints))

    def _ensure_open(self) -> None:
        if not self._socks:
            loop = asyncio.get_running_loop()
            for endpoint in self.endpoints:
                sock = _configure(self._ctx.socket(zmq.DEALER), endpoint, self.curve)
                self._socks.append(sock)
                self._readers.append(loop.create_task(self._read(sock)))

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
        self._ensure_open()
        plan = Failover(self._rotation, self.timeout if timeout is None else timeout, asyncio.get_running_loop().time)
        for index, remaining in plan.tries():
            try:
                reply = await self._request_on(index, payload, remaining)
            except (DaemonUnavailable, DaemonTimeout) as exc:
                plan.failed(exc)
                continue
            if plan.accept(reply):
                return reply
        return plan.give_up(self.endpoint)

    async def _request_on(self, index: int, payload: dict, timeout: float) -> dict:
        sock, endpoint = self._socks[index], self.endpoints[index]
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
                    expect_fingerprint: str | None = None, model: str | None = None) -> EmbedResult:
        payload = embed_request(inputs, instruction, dimension, normalize, encoding, expect_fingerprint, model)
        return EmbedReply.from_wire(checked(await self.request(payload, timeout)))

    async def rerank(self, query: Any, documents: list, instruction: str | None = None,
                     timeout: float | None = None, top_n: int | None = None,
                     expect_fingerprint: str | None = None, model: str | None = None) -> RerankResult:
        payload = rerank_request(query, documents, instruction, top_n, expect_fingerprint, model)
        return RerankReply.from_wire(checked(await self.request(payload, timeout)))

    async def health(self, timeout: float | None = None) -> dict:
        return checked(await self.request(health_request(), timeout))

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        for sock in self._socks:
            sock.close(linger=0)
        self._socks, self._readers = [], []

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
