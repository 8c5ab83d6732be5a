"""The wire schema, protocol version 1 (PROTOCOL.md): the one place that knows what goes on the wire.

Requests and replies are typed here, with the encoders and decoders that every end uses: the server
(decode a request, encode its reply), the Python clients (build requests, read replies) and the HTTP
bridge (through the client). Adding an op or a field means a type here and a handler in handlers.py.

Parsing is pure validation: it reads no media and touches no model, so the socket loop runs it on
every request at once and answers bad requests without queueing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

from .config import Limits, MediaPolicy
from .errors import ErrorCode, RequestError, invalid, too_large
from .inputs import InputItem, parse_input, parse_instruction

__all__ = [
    "PROTOCOL_VERSION", "OPS", "ENCODINGS", "MAX_DEADLINE_MS", "DEADLINE_OPS", "ErrorCode", "RequestError",
    "DaemonError", "EmbedRequest", "RerankRequest", "HealthRequest", "MetricsRequest", "Request",
    "EmbedReply", "RerankReply", "HealthReply", "ModelHealth", "MetricsReply", "Reply",
    "pack", "unpack", "decode_payload", "parse_request", "encode_reply", "encode_error", "decode_reply",
    "checked", "embed_request", "rerank_request", "health_request", "metrics_request", "with_deadline",
]

PROTOCOL_VERSION = 1
ENCODINGS = ("float32", "list")
MAX_DEADLINE_MS = 86_400_000  # one day
DEADLINE_OPS = ("embed", "rerank")  # the ops that take deadline_ms


# -- msgpack ----------------------------------------------------------------------------------------
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


# -- requests ---------------------------------------------------------------------------------------
def _known_fields(payload: dict, allowed: frozenset[str], op: str) -> None:
    unknown = sorted(str(k) for k in payload if k not in allowed)
    if unknown:
        raise invalid(f"{op}: unknown field(s) {', '.join(unknown)}")


def _input_list(value: Any, field_name: str, limit: int, limit_name: str, limits: Limits, media: MediaPolicy):
    if not isinstance(value, list):
        raise invalid(f"{field_name}: expected a list of inputs")
    if not value:
        raise invalid(f"{field_name}: must not be empty")
    if len(value) > limit:
        raise too_large(f"{field_name}: {len(value)} items exceed the limit of {limit} ({limit_name})")
    return tuple(parse_input(v, f"{field_name}[{i}]", limits, media) for i, v in enumerate(value))


def _deadline(payload: dict) -> float | None:
    """`deadline_ms`: milliseconds from the daemon's receipt of the request after which work not yet
    done is dropped and the request answered `deadline_exceeded`; nil or absent: no deadline."""
    value = payload.get("deadline_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DEADLINE_MS:
        raise invalid(f"deadline_ms: expected a positive number of milliseconds up to {MAX_DEADLINE_MS}, or nil")
    return float(value)


def _required(payload: dict, *names: str) -> None:
    for name in names:
        if name not in payload:
            raise invalid(f"{name}: required")


@dataclass(frozen=True)
class EmbedRequest:
    op: ClassVar[str] = "embed"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"op", "id", "inputs", "instruction", "dimension", "normalize", "encoding", "deadline_ms"})

    id: Any
    inputs: tuple[InputItem, ...]
    instruction: str | None = None
    dimension: int | None = None
    normalize: bool = True
    encoding: str = "float32"
    deadline_ms: float | None = None

    @classmethod
    def from_wire(cls, payload: dict, limits: Limits, media: MediaPolicy) -> "EmbedRequest":
        _known_fields(payload, cls.FIELDS, cls.op)
        _required(payload, "inputs")
        inputs = _input_list(payload["inputs"], "inputs", limits.max_inputs, "max_inputs", limits, media)
        dimension = payload.get("dimension")
        if dimension is not None and (isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1):
            raise invalid("dimension: expected a positive integer or nil")
        normalize = payload.get("normalize")
        if normalize is None:
            normalize = True
        if not isinstance(normalize, bool):
            raise invalid("normalize: expected a boolean")
        encoding = payload.get("encoding")
        if encoding is None:
            encoding = "float32"
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise invalid(f"encoding: expected one of {', '.join(ENCODINGS)}")
        return cls(id=payload.get("id"), inputs=inputs,
                   instruction=parse_instruction(payload.get("instruction"), "instruction", limits),
                   dimension=dimension, normalize=normalize, encoding=encoding, deadline_ms=_deadline(payload))


@dataclass(frozen=True)
class RerankRequest:
    op: ClassVar[str] = "rerank"
    FIELDS: ClassVar[frozenset[str]] = frozenset({"op", "id", "query", "documents", "instruction", "deadline_ms"})

    id: Any
    query: InputItem
    documents: tuple[InputItem, ...]
    instruction: str | None = None
    deadline_ms: float | None = None

    @classmethod
    def from_wire(cls, payload: dict, limits: Limits, media: MediaPolicy) -> "RerankRequest":
        _known_fields(payload, cls.FIELDS, cls.op)
        _required(payload, "query", "documents")
        return cls(
            id=payload.get("id"),
            query=parse_input(payload["query"], "query", limits, media),
            documents=_input_list(payload["documents"], "documents", limits.max_documents, "max_documents",
                                  limits, media),
            instruction=parse_instruction(payload.get("instruction"), "instruction", limits),
            deadline_ms=_deadline(payload),
        )


@dataclass(frozen=True)
class _IdOnly:
    """A request of no fields but `id`; other keys are ignored, as they always were for these ops."""

    id: Any = None

    @classmethod
    def from_wire(cls, payload: dict, limits: Limits, media: MediaPolicy) -> "_IdOnly":
        return cls(id=payload.get("id"))


@dataclass(frozen=True)
class HealthRequest(_IdOnly):
    op: ClassVar[str] = "health"


@dataclass(frozen=True)
class MetricsRequest(_IdOnly):
    op: ClassVar[str] = "metrics"


Request = EmbedRequest | RerankRequest | HealthRequest | MetricsRequest
REQUEST_TYPES: dict[str, type] = {t.op: t for t in (EmbedRequest, RerankRequest, HealthRequest, MetricsRequest)}
OPS = tuple(REQUEST_TYPES)


def parse_request(payload: dict, limits: Limits, media: MediaPolicy) -> Request:
    """The typed request of a decoded payload, or a RequestError naming the field."""
    op = payload.get("op")
    if not isinstance(op, str):
        raise invalid(f"op: required, a string ({', '.join(OPS[:-1])} or {OPS[-1]})")
    request_type = REQUEST_TYPES.get(op)
    if request_type is None:
        raise RequestError(ErrorCode.UNSUPPORTED, f"op: unknown operation {op[:64]!r} (supported: {', '.join(OPS)})")
    return request_type.from_wire(payload, limits, media)


# -- replies ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedReply:
    """`embeddings` is float32, shape (count, dimension), in input order."""

    embeddings: np.ndarray
    dimension: int
    model: str
    tokens: int
    encoding: str = "float32"

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    def to_wire(self) -> dict:
        vectors = np.ascontiguousarray(self.embeddings, dtype="<f4")
        encoded = vectors.tobytes() if self.encoding == "float32" else vectors.tolist()
        return {"embeddings": encoded, "dimension": self.dimension, "count": self.count,
                "encoding": self.encoding, "model": self.model, "tokens": self.tokens}

    @classmethod
    def from_wire(cls, body: dict) -> "EmbedReply":
        count, dim = body["count"], body["dimension"]
        encoding = body.get("encoding", "float32")
        if encoding == "float32":
            vectors = np.frombuffer(body["embeddings"], dtype="<f4").reshape(count, dim)
        else:
            vectors = np.asarray(body["embeddings"], dtype=np.float32).reshape(count, dim)
        return cls(vectors, dim, body["model"], body["tokens"], encoding)


@dataclass(frozen=True)
class RerankReply:
    scores: list[float]  # one per document, in document order
    model: str
    tokens: int

    def to_wire(self) -> dict:
        return {"scores": [float(s) for s in self.scores], "model": self.model, "tokens": self.tokens}

    @classmethod
    def from_wire(cls, body: dict) -> "RerankReply":
        return cls(list(body["scores"]), body["model"], body["tokens"])


@dataclass(frozen=True)
class ModelHealth:
    name: str | None
    enabled: bool
    loaded: bool
    dimension: int | None = None  # embedding only: the default output dimension
    max_dimension: int | None = None  # embedding only

    def to_wire(self, with_dimensions: bool) -> dict:
        body = {"name": self.name, "enabled": self.enabled, "loaded": self.loaded}
        if with_dimensions:
            body.update(dimension=self.dimension, max_dimension=self.max_dimension)
        return body

    @classmethod
    def from_wire(cls, body: dict | None) -> "ModelHealth":
        body = body or {}
        return cls(body.get("name"), bool(body.get("enabled")), bool(body.get("loaded")),
                   body.get("dimension"), body.get("max_dimension"))


@dataclass(frozen=True)
class HealthReply:
    status: str  # loading | ready | draining
    version: str
    uptime_s: float
    queue_depth: int
    queued_tokens: int
    device: str | None
    dtype: str | None
    embedding: ModelHealth
    reranker: ModelHealth
    stats: dict = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION
    load: dict = field(default_factory=dict)  # step (str/nil), total_s, import_s, weights_s, warmup_s

    def to_wire(self) -> dict:
        return {"status": self.status, "version": self.version, "protocol": self.protocol,
                "uptime_s": round(self.uptime_s, 3), "queue_depth": self.queue_depth,
                "queued_tokens": self.queued_tokens, "device": self.device, "dtype": self.dtype,
                "embedding": self.embedding.to_wire(True), "reranker": self.reranker.to_wire(False),
                "stats": self.stats, "load": self.load}

    @classmethod
    def from_wire(cls, body: dict) -> "HealthReply":
        return cls(status=str(body.get("status")), version=str(body.get("version")),
                   uptime_s=float(body.get("uptime_s", 0.0)), queue_depth=int(body.get("queue_depth", 0)),
                   queued_tokens=int(body.get("queued_tokens", 0)), device=body.get("device"),
                   dtype=body.get("dtype"), embedding=ModelHealth.from_wire(body.get("embedding")),
                   reranker=ModelHealth.from_wire(body.get("reranker")), stats=dict(body.get("stats") or {}),
                   protocol=int(body.get("protocol", PROTOCOL_VERSION)), load=dict(body.get("load") or {}))


@dataclass(frozen=True)
class MetricsReply:
    """Counters since start; histograms as {"buckets", "counts" (cumulative, +Inf last), "sum"}."""

    requests: dict
    errors: dict
    inputs: dict
    tokens: dict
    latency_s: dict
    batch_size: dict
    forward_s: float
    queue_wait_s: float
    queue_depth: int
    queued_tokens: int
    uptime_s: float

    def to_wire(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_wire(cls, body: dict) -> "MetricsReply":
        return cls(**{name: body[name] for name in cls.__dataclass_fields__})


Reply = EmbedReply | RerankReply | HealthReply | MetricsReply


def encode_reply(request_id: Any, reply: Reply) -> bytes:
    return pack({"id": request_id, "ok": True, **reply.to_wire()})


def encode_error(request_id: Any, error: RequestError) -> bytes:
    return pack({"id": request_id, "ok": False, "error": error.to_wire()})


def decode_reply(data: bytes) -> dict:
    return unpack(data)


class DaemonError(Exception):
    """The daemon answered with an error; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def checked(reply: dict) -> dict:
    """The reply map when it is a success; else DaemonError with its code and message."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise DaemonError(str(error.get("code", ErrorCode.INTERNAL.value)), str(error.get("message", "")))
    return reply


# -- request builders (the clients' side) ----------------------------------------------------------
def embed_request(inputs: list, instruction: str | None = None, dimension: int | None = None,
                  normalize: bool = True) -> dict:
    return {"op": "embed", "inputs": list(inputs), "instruction": instruction, "dimension": dimension,
            "normalize": normalize}


def rerank_request(query: Any, documents: list, instruction: str | None = None) -> dict:
    return {"op": "rerank", "query": query, "documents": list(documents), "instruction": instruction}


def health_request() -> dict:
    return {"op": "health"}


def metrics_request() -> dict:
    return {"op": "metrics"}


def with_deadline(payload: dict, timeout: float) -> dict:
    """The payload carrying the caller's remaining time as `deadline_ms` (unless it has its own), so
    that the daemon drops work nobody waits for any more."""
    if payload.get("op") not in DEADLINE_OPS or payload.get("deadline_ms") is not None:
        return payload
    return {**payload, "deadline_ms": max(1, min(MAX_DEADLINE_MS, int(timeout * 1000)))}
