"""What keeps one hostile or broken HTTP client from costing the bridge's other clients anything:
a body size limit, a deadline for the body, and a deadline for the request headers.

uvicorn alone waits for ever on a client that sends half a request line or half a body (measured:
a connection holding `POST /embed HTTP/1.1\\r\\nHost: x\\r\\n` was still open after 90 s), so enough
such connections would use up the bridge's file descriptors.
"""

from __future__ import annotations

import asyncio
import json
import time

from uvicorn.protocols.http.h11_impl import H11Protocol


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class BodyGuard:
    """ASGI middleware: 413 for a body over `max_bytes` (declared or streamed), 408 for a body
    that has not fully arrived `timeout_s` after its headers.

    The app may catch the error raised from `receive` (FastAPI turns any failure while reading a
    body into its own 400), so the guard's answer replaces whatever the app sends after it."""

    def __init__(self, app, max_bytes: int | None, timeout_s: float | None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if self.max_bytes and declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _refuse(send, *self._too_large())
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        seen, failure, answered = 0, [], []

        async def guarded_receive():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), None if deadline is None
                                                 else max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                failure.append((408, _error_body("timeout", f"the request body took longer than "
                                                            f"{self.timeout_s:g} s to arrive")))
                raise BodyRefused from None
            seen += len(message.get("body", b""))
            if self.max_bytes and seen > self.max_bytes:
                failure.append(self._too_large())
                raise BodyRefused
            return message

        async def guarded_send(message):
            if failure:  # the app's own answer to the failed read is replaced by ours
                if message["type"] == "http.response.start":
                    answered.append(True)
                    await _refuse(send, *failure[0])
                return
            answered.append(message["type"] == "http.response.start")
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except BodyRefused:
            if not any(answered):
                await _refuse(send, *failure[0])

    @staticmethod
    def _too_large() -> tuple[int, bytes]:
        return 413, _error_body("too_large", "request body exceeds the bridge's limit")


async def _refuse(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyRefused(Exception):
    """Raised from `receive` when the body is over the limit or late."""


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived
    `timeout_s` after it opened or after its previous response ended."""

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_overdue)

        def _headers_overdue(self) -> None:
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11
