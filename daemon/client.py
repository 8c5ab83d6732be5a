"""Python clients for the daemon: `Client` (blocking, thread-safe) and `AsyncClient` (asyncio, many
requests in flight on one socket). Both speak PROTOCOL.md over a DEALER socket."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from .config import default_endpoint
from .protocol import pack, unpack


class DaemonError(Exception):
    """The daemon answered with an error; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonTimeout(TimeoutError):
    """No reply in time. The client has reset its socket and is usable again."""


class DaemonUnavailable(ConnectionError):
    """No daemon is connected on the endpoint (not started, or restarting)."""


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # float32, shape (count, dimension)
    dimension: int
    model: str
    tokens: int


@dataclass(frozen=True)
class RerankResult:
    scores: list[float]
    model: str
    tokens: int


def embed_payload(inputs: list, instruction: str | None = None, dimension: int | None = None,
                  normalize: bool = True) -> dict:
    return {"op": "embed", "inputs": list(inputs), "instruction": instruction, "dimension": dimension,
            "normalize": normalize}


def rerank_payload(query: Any, documents: list, instruction: str | None = None) -> dict:
    return {"op": "rerank", "query": query, "documents": list(documents), "instruction": instruction}


def _tag(request_id: int) -> bytes:
    """A routing frame before the delimiter: the daemon echoes it, so a reply is matched to its
    request even when the daemon could not read the payload's id (an oversized or corrupt payload)."""
    return request_id.to_bytes(8, "big")


def _checked(reply: dict) -> dict:
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise DaemonError(str(error.get("code", "internal")), str(error.get("message", "")))
    return reply


def embed_result(reply: dict) -> EmbedResult:
    reply = _checked(reply)
    count, dim = reply["count"], reply["dimension"]
    if reply.get("encoding", "float32") == "float32":
        vectors = np.frombuffer(reply["embeddings"], dtype="<f4").reshape(count, dim)
    else:
        vectors = np.asarray(reply["embeddings"], dtype=np.float32).reshape(count, dim)
    return EmbedResult(vectors, dim, reply["model"], reply["tokens"])


def rerank_result(reply: dict) -> RerankResult:
    reply = _checked(reply)
    return RerankResult(list(reply["scores"]), reply["model"], reply["tokens"])


class Client:
    """A blocking client, safe to share between threads (one request on the socket at a time).

    On a timeout the socket is closed and reopened (the ZeroMQ guide's lazy pirate pattern), so a
    late reply can never be mistaken for the answer to the next request.
    """

    def __init__(self, endpoint: str | None = None, timeout: float = 60.0, context: zmq.Context | None = None):
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        return sock

    def request(self, payload: dict, timeout: float | None = None) -> dict:
        """Send one payload and return the reply map (errors are in it, not raised)."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            request_id = next(self._ids)
            self._sock.send_multipart([_tag(request_id), b"", pack({**payload, "id": request_id})])
            while self._sock.poll(int(timeout * 1000)):
                frames = self._sock.recv_multipart()
                if frames[0] == _tag(request_id):
                    return unpack(frames[-1])
            self._sock.close(linger=0)
            self._sock = self._connect()
            raise DaemonTimeout(f"no reply from {self.endpoint} within {timeout:g}s")

    def embed(self, inputs: list, instruction: str | None = None, dimension: int | None = None,
              normalize: bool = True, timeout: float | None = None) -> EmbedResult:
        return embed_result(self.request(embed_payload(inputs, instruction, dimension, normalize), timeout))

    def rerank(self, query: Any, documents: list, instruction: str | None = None,
               timeout: float | None = None) -> RerankResult:
        return rerank_result(self.request(rerank_payload(query, documents, instruction), timeout))

    def health(self, timeout: float | None = None) -> dict:
        return _checked(self.request({"op": "health"}, timeout))

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """An asyncio client: any number of requests in flight on one DEALER socket, matched by id.

    Requests are only queued to a connected daemon (ZMQ_IMMEDIATE): while none is connected, a
    request waits up to `connect_timeout` and then fails with DaemonUnavailable instead of being
    delivered long after its caller gave up. ZeroMQ reconnects by itself when the daemon is back.
    """

    def __init__(self, endpoint: str | None = None, timeout: float = 60.0, connect_timeout: float = 1.0):
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ctx = zmq.asyncio.Context.instance()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None

    def _ensure_open(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.linger = 0
            self._sock.immediate = 1
            self._sock.reconnect_ivl = 100
            self._sock.reconnect_ivl_max = 1000
            self._sock.connect(self.endpoint)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._sock))
        return self._sock

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            future = self._pending.pop(int.from_bytes(frames[0], "big"), None) if len(frames) == 3 else None
            if future is not None and not future.done():
                try:
                    future.set_result(unpack(frames[-1]))
                except Exception as exc:  # a reply we cannot read fails only its own request
                    future.set_exception(exc)

    async def request(self, payload: dict, timeout: float | None = None) -> dict:
        sock = self._ensure_open()
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            if not await sock.poll(int(self.connect_timeout * 1000), zmq.POLLOUT):
                raise DaemonUnavailable(f"no daemon is connected on {self.endpoint}")
            await sock.send_multipart([_tag(request_id), b"", pack({**payload, "id": request_id})])
            return await asyncio.wait_for(future, self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            raise DaemonTimeout(f"no reply from {self.endpoint} within {timeout or self.timeout:g}s") from None
        finally:
            self._pending.pop(request_id, None)

    async def embed(self, inputs: list, instruction: str | None = None, dimension: int | None = None,
                    normalize: bool = True, timeout: float | None = None) -> EmbedResult:
        return embed_result(await self.request(embed_payload(inputs, instruction, dimension, normalize), timeout))

    async def rerank(self, query: Any, documents: list, instruction: str | None = None,
                     timeout: float | None = None) -> RerankResult:
        return rerank_result(await self.request(rerank_payload(query, documents, instruction), timeout))

    async def health(self, timeout: float | None = None) -> dict:
        return _checked(await self.request({"op": "health"}, timeout))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock, self._reader = None, None
