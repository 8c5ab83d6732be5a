"""Wire protocol version 1 (see PROTOCOL.md): msgpack payloads, typed requests, replies.

Parsing here is pure validation: it reads no media and touches no model, so the socket loop can run
it on every request at once and answer bad requests without queueing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .config import Limits, MediaPolicy
from .errors import ErrorCode, RequestError, invalid, too_large
from .inputs import InputItem, parse_input, parse_instruction

PROTOCOL_VERSION = 1
OPS = ("embed", "rerank", "health", "metrics")
ENCODINGS = ("float32", "list")


@dataclass(frozen=True)
class EmbedRequest:
    id: Any
    inputs: tuple[InputItem, ...]
    instruction: str | None
    dimension: int | None
    normalize: bool
    encoding: str
    deadline_ms: float | None = None


@dataclass(frozen=True)
class RerankRequest:
    id: Any
    query: InputItem
    documents: tuple[InputItem, ...]
    instruction: str | None
    deadline_ms: float | None = None


@dataclass(frozen=True)
class HealthRequest:
    id: Any


@dataclass(frozen=True)
class MetricsRequest:
    id: Any


Request = EmbedRequest | RerankRequest | HealthRequest | MetricsRequest


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, max_items: int = 2**31 - 1) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=max_items, max_map_len=max_items)


def nesting_depth(obj: Any, stop_at: int) -> int:
    """How deeply arrays and maps nest in `obj` (a scalar is 0), counting no further than `stop_at`.

    Level by level, so the cost is one pass over the containers' items; map keys are strings or bytes
    (`strict_map_key`), so only values can nest."""
    level, current = 0, [obj]
    while level <= stop_at:
        containers = [v for v in current if type(v) is list or type(v) is dict]
        if not containers:
            return level
        level += 1
        current = []
        for c in containers:
            current.extend(c.values() if type(c) is dict else c)
    return level


def ok_reply(request_id: Any, **fields: Any) -> bytes:
    return pack({"id": request_id, "ok": True, **fields})


def error_reply(request_id: Any, error: RequestError) -> bytes:
    return pack({"id": request_id, "ok": False, "error": error.to_wire()})


def _too_deep(limits: Limits) -> RequestError:
    return too_large(f"payload: arrays and maps nest deeper than {limits.max_msgpack_depth} levels "
                     "(max_msgpack_depth)")


def decode_payload(data: bytes, limits: Limits) -> dict:
    """The payload as a map, or a RequestError (`too_large` / `invalid_request`)."""
    if len(data) > limits.max_message_bytes:
        raise too_large(f"payload: {len(data)} bytes exceed the limit of {limits.max_message_bytes} (max_message_bytes)")
    try:
        payload = unpack(data, limits.max_msgpack_items)
    except msgpack.exceptions.StackError:  # deeper than msgpack's own stack (1024): over any depth limit
        raise _too_deep(limits) from None
    except ValueError as exc:  # msgpack names a container over its length limit in a ValueError
        if "exceeds max_" in str(exc):
            raise too_large(f"payload: an array or map exceeds {limits.max_msgpack_items} items "
                            "(max_msgpack_items)") from None
        raise invalid("payload: not a valid msgpack document") from None
    except Exception:
        raise invalid("payload: not a valid msgpack document") from None
    if nesting_depth(payload, limits.max_msgpack_depth) > limits.max_msgpack_depth:
        raise _too_deep(limits)
    if not isinstance(payload, dict):
        raise invalid("payload: expected a msgpack map with an 'op' field")
    return payload


def _known_fields(payload: dict, allowed: set[str], op: str) -> None:
    unknown = sorted(str(k) for k in payload if k not in allowed)
    if unknown:
        raise invalid(f"{op}: unknown field(s) {', '.join(unknown)}")


def _input_list(value: Any, field: str, limit: int, limit_name: str, limits: Limits, media: MediaPolicy):
    if not isinstance(value, list):
        raise invalid(f"{field}: expected a list of inputs")
    if not value:
        raise invalid(f"{field}: must not be empty")
    if len(value) > limit:
        raise too_large(f"{field}: {len(value)} items exceed the limit of {limit} ({limit_name})")
    return tuple(parse_input(v, f"{field}[{i}]", limits, media) for i, v in enumerate(value))


MAX_DEADLINE_MS = 86_400_000  # one day


def _deadline(payload: dict) -> float | None:
    """`deadline_ms`: milliseconds from the daemon's receipt of the request after which work not yet
    done is dropped and the request answered `deadline_exceeded`; nil or absent: no deadline."""
    value = payload.get("deadline_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DEADLINE_MS:
        raise invalid(f"deadline_ms: expected a positive number of milliseconds up to {MAX_DEADLINE_MS}, or nil")
    return float(value)


def _parse_embed(payload: dict, limits: Limits, media: MediaPolicy) -> EmbedRequest:
    _known_fields(payload, {"op", "id", "inputs", "instruction", "dimension", "normalize", "encoding",
                            "deadline_ms"}, "embed")
    if "inputs" not in payload:
        raise invalid("inputs: required")
    inputs = _input_list(payload["inputs"], "inputs", limits.max_inputs, "max_inputs", limits, media)
    dimension = payload.get("dimension")
    if dimension is not None and (isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1):
        raise invalid("dimension: expected a positive integer or nil")
    normalize = payload.get("normalize", True)
    if normalize is None:
        normalize = True
    if not isinstance(normalize, bool):
        raise invalid("normalize: expected a boolean")
    encoding = payload.get("encoding")
    if encoding is None:
        encoding = "float32"
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise invalid(f"encoding: expected one of {', '.join(ENCODINGS)}")
    return EmbedRequest(
        id=payload.get("id"),
        inputs=inputs,
        instruction=parse_instruction(payload.get("instruction"), "instruction", limits),
        dimension=dimension,
        normalize=normalize,
        encoding=encoding,
        deadline_ms=_deadline(payload),
    )


def _parse_rerank(payload: dict, limits: Limits, media: MediaPolicy) -> RerankRequest:
    _known_fields(payload, {"op", "id", "query", "documents", "instruction", "deadline_ms"}, "rerank")
    if "query" not in payload:
        raise invalid("query: required")
    if "documents" not in payload:
        raise invalid("documents: required")
    return RerankRequest(
        id=payload.get("id"),
        query=parse_input(payload["query"], "query", limits, media),
        documents=_input_list(payload["documents"], "documents", limits.max_documents, "max_documents",
                              limits, media),
        instruction=parse_instruction(payload.get("instruction"), "instruction", limits),
        deadline_ms=_deadline(payload),
    )


def parse_request(payload: dict, limits: Limits, media: MediaPolicy) -> Request:
    op = payload.get("op")
    if not isinstance(op, str):
        raise invalid("op: required, a string (embed, rerank, health or metrics)")
    if op == "embed":
        return _parse_embed(payload, limits, media)
    if op == "rerank":
        return _parse_rerank(payload, limits, media)
    if op == "health":
        return HealthRequest(id=payload.get("id"))
    if op == "metrics":
        return MetricsRequest(id=payload.get("id"))
    raise RequestError(ErrorCode.UNSUPPORTED, f"op: unknown operation {op[:64]!r} (supported: {', '.join(OPS)})")
