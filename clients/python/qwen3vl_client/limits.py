"""The daemon's per-request limits (`Limits`, which `health` reports), and a client's own check of a request's size against its daemon's `max_message_bytes`.

A daemon answers a payload a little over its limit with `too_large`; one far past it (more than
the limit plus TRANSPORT_SLACK) is dropped by its socket, which closes the connection without a
word. So a client refuses such a request itself, before sending: it asks the daemon's `health`
for its limit (`limits.max_message_bytes`) before each payload that only a limit could refuse (a
daemon restarted meanwhile may have another; one round trip beside a payload of megabytes), and
takes PROTOCOL.md's default from a daemon too old to say.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import too_large


@dataclass(frozen=True)
class Limits:
    """Per-request limits; exceeding one is answered with `too_large` naming the limit."""

    max_message_bytes: int = 64 * 1024 * 1024  # also set on the socket (ZMQ_MAXMSGSIZE)
    max_inputs: int = 1024
    max_documents: int = 1024
    max_text_chars: int = 1_000_000  # each text and instruction
    max_msgpack_depth: int = 32  # nesting of arrays and maps (a valid request needs 6)
    max_msgpack_items: int = 65536  # items in one array or map


DEFAULT_MAX_MESSAGE_BYTES = Limits.max_message_bytes
# Every daemon answers a payload up to its limit plus this (the smallest limit is 1024 bytes), so
# smaller payloads need no known limit.
ANSWERED_UP_TO_BYTES = 1 << 20


class SizeGuard:
    """Each daemon's max_message_bytes as its last health said (by endpoint)."""

    def __init__(self) -> None:
        self._limits: dict[str, int] = {}

    @staticmethod
    def needs_limit(size: int) -> bool:
        """Whether the daemon's limit must be asked for before a payload of `size` bytes goes."""
        return size > ANSWERED_UP_TO_BYTES

    def noted(self, endpoint: str, payload: dict, reply: dict) -> dict:
        """`reply`, after learning the daemon's limit from it if it answers a health request."""
        if payload.get("op") == "health":
            limits = reply.get("limits") if reply.get("ok") else None
            value = limits.get("max_message_bytes") if isinstance(limits, dict) else None
            known = isinstance(value, int) and not isinstance(value, bool) and value > 0
            self._limits[endpoint] = value if known else DEFAULT_MAX_MESSAGE_BYTES
        return reply

    def forget(self, endpoint: str) -> None:
        """A daemon lost or replaced may come back with another limit."""
        self._limits.pop(endpoint, None)

    def refusal(self, endpoint: str, size: int) -> dict | None:
        """The too_large reply for a payload over the daemon's limit, else None."""
        limit = self._limits.get(endpoint, DEFAULT_MAX_MESSAGE_BYTES)
        if size <= limit:
            return None
        error = too_large(f"payload: {size} bytes exceed the limit of {limit} (max_message_bytes of {endpoint}); "
                          "not sent")
        return {"ok": False, "error": error.to_wire()}
