"""The wire schema, protocol version 1 (PROTOCOL.md): the one place that knows what goes on the wire.

Requests and replies are typed here, with the encoders and decoders that every end uses: the server
(decode a request, encode its reply), the Python clients (build requests, read replies) and the HTTP
bridge (through the client). Adding an op or a field means a type here and a handler in the daemon's
handlers.py.

Parsing is pure validation: it reads no media and touches no model, so the socket loop runs it on
every request at once and answers bad requests without queueing them.

numpy is optional: with it, embeddings are decoded as arrays (and the daemon encodes its own);
without it, as lists of rows. Nothing imports it until a reply is decoded or encoded.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from .errors import DaemonError, ErrorCode, ModelMismatch, RequestError, UnknownModel, invalid, too_large
from .fields import BATCH, COMPACT, INTERACTIVE, PRIORITIES, SCALED, row_bytes
from .inputs import FrameLimit, InputItem, parse_input, parse_instruction
from .limits import Limits

__all__ = [
    "PROTOCOL_VERSION", "OPS", "ENCODINGS", "PRIORITIES", "INTERACTIVE", "BATCH", "MAX_DEADLINE_MS", "DEADLINE_OPS",
    "ErrorCode", "RequestError", "DaemonError", "ModelMismatch", "UnknownModel",
    "EmbedRequest", "RerankRequest", "HealthRequest", "MetricsRequest", "Request",
    "EmbedReply", "RerankReply", "HealthReply", "ModelHealth", "MetricsReply", "Reply",
    "pack", "unpack", "decode_payload", "parse_request", "encode_reply", "encode_error", "decode_reply",
    "checked", "top_indices", "encode_rows", "as_lists", "refuses_priority", "without_priority",
    "embed_request", "rerank_request", "health_request", "metrics_request", "with_deadline",
]

PROTOCOL_VERSION = 1
ENCODINGS = ("float32", "list", *COMPACT)
MAX_FINGERPRINT_CHARS = 128
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


def _input_list(value: Any, field_name: str, limit: int, limit_name: str, limits: Limits, media: FrameLimit):
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


def _expect_fingerprint(payload: dict) -> str | None:
    """`expect_fingerprint`: the model fingerprint (health) the client built its index with; nil or
    absent: any model."""
    value = payload.get("expect_fingerprint")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_FINGERPRINT_CHARS:
        raise invalid("expect_fingerprint: expected a fingerprint string (as health reports it), or nil")
    return value


MAX_MODEL_CHARS = 256


def _model(payload: dict) -> str | None:
    """`model`: the name (or configured path or hub id) of the model to use, as health lists them;
    nil or absent: the default, or the one whose fingerprint is expect_fingerprint."""
    value = payload.get("model")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MODEL_CHARS:
        raise invalid(f"model: expected a model name (as health lists them, at most {MAX_MODEL_CHARS} characters), "
                      "or nil")
    return value


def _priority(payload: dict) -> str:
    """`priority`: interactive (someone waits on it; the default) or batch (bulk work that yields to
    interactive work, down to a decoder layer); nil or absent: interactive."""
    value = payload.get("priority")
    if value is None:
        return INTERACTIVE
    if not isinstance(value, str) or value not in PRIORITIES:
        raise invalid(f"priority: expected {' or '.join(PRIORITIES)}, or nil")
    return value


def _required(payload: dict, *names: str) -> None:
    for name in names:
        if name not in payload:
            raise invalid(f"{name}: required")


@dataclass(frozen=True)
class EmbedRequest:
    op: ClassVar[str] = "embed"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"op", "id", "inputs", "instruction", "dimension", "normalize", "encoding", "deadline_ms",
         "expect_fingerprint", "model", "priority"})

    id: Any
    inputs: tuple[InputItem, ...]
    instruction: str | None = None
    dimension: int | None = None
    normalize: bool = True
    encoding: str = "float32"
    deadline_ms: float | None = None
    expect_fingerprint: str | None = None
    model: str | None = None
    priority: str = INTERACTIVE

    @classmethod
    def from_wire(cls, payload: dict, limits: Limits, media: FrameLimit) -> "EmbedRequest":
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
        if encoding in SCALED and not normalize:
            raise invalid(f"normalize: {encoding} quantizes unit vectors; it needs normalize true")
        return cls(id=payload.get("id"), inputs=inputs,
                   instruction=parse_instruction(payload.get("instruction"), "instruction", limits),
                   dimension=dimension, normalize=normalize, encoding=encoding, deadline_ms=_deadline(payload),
                   expect_fingerprint=_expect_fingerprint(payload), model=_model(payload),
                   priority=_priority(payload))


@dataclass(frozen=True)
class RerankRequest:
    op: ClassVar[str] = "rerank"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"op", "id", "query", "documents", "instruction", "deadline_ms", "top_n", "expect_fingerprint", "model",
         "priority"})

    id: Any
    query: InputItem
    documents: tuple[InputItem, ...]
    instruction: str | None = None
    deadline_ms: float | None = None
    top_n: int | None = None
    expect_fingerprint: str | None = None
    model: str | None = None
    priority: str = INTERACTIVE

    @classmethod
    def from_wire(cls, payload: dict, limits: Limits, media: FrameLimit) -> "RerankRequest":
        _known_fields(payload, cls.FIELDS, cls.op)
        _required(payload, "query", "documents")
        return cls(
            id=payload.get("id"),
            query=parse_input(payload["query"], "query", limits, media),
            documents=_input_list(payload["documents"], "documents", limits.max_documents, "max_documents",
                                  limits, media),
            instruction=parse_instruction(payload.get("instruction"), "instruction", limits),
            deadline_ms=_deadline(payload),
            top_n=_top_n(payload),
            expect_fingerprint=_expect_fingerprint(payload),
            model=_model(payload),
            priority=_priority(payload),
        )


def _top_n(payload: dict) -> int | None:
    value = payload.get("top_n")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise invalid("top_n: expected a positive integer or nil")
    return value


@dataclass(frozen=True)
class _IdOnly:
    """A request of no fields but `id`; other keys are ignored, as they always were for these ops."""

    id: Any = None

    @classmethod
    def from_wire(cls, payload: dict, limits: Limits, media: FrameLimit) -> "_IdOnly":
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


def parse_request(payload: dict, limits: Limits, media: FrameLimit) -> Request:
    """The typed request of a decoded payload, or a RequestError naming the field."""
    op = payload.get("op")
    if not isinstance(op, str):
        raise invalid(f"op: required, a string ({', '.join(OPS[:-1])} or {OPS[-1]})")
    request_type = REQUEST_TYPES.get(op)
    if request_type is None:
        raise RequestError(ErrorCode.UNSUPPORTED, f"op: unknown operation {op[:64]!r} (supported: {', '.join(OPS)})")
    return request_type.from_wire(payload, limits, media)


# -- replies ----------------------------------------------------------------------------------------
# The element type of each binary encoding's rows, as numpy's dtype and the array module's typecode
# (float32: little-endian on the wire).
ENCODING_DTYPES = {"float32": "<f4", "int8": "i1", "uint8": "u1", "binary": "i1", "ubinary": "u1"}
_TYPECODES = {"<f4": "f", "i1": "b", "u1": "B"}


@functools.cache
def _numpy_installed() -> bool:
    return importlib.util.find_spec("numpy") is not None


def _numpy():
    """numpy if it is installed (vectors as arrays), else None (vectors as lists of rows). Looked for
    once per process: a failed import on every reply would cost ~0.1 ms each."""
    if "numpy" in sys.modules:  # imported already (None where an import of it is blocked)
        return sys.modules["numpy"]
    if not _numpy_installed():
        return None
    import numpy

    return numpy


def encode_rows(rows: Any, encoding: str) -> bytes | list:
    """An embeddings matrix (an array, or a list of rows) as `encoding` puts it on the wire."""
    np = _numpy()
    if encoding == "list":
        if np is not None:
            return np.asarray(rows, dtype=np.float32).tolist()
        return [array("f", row).tolist() for row in rows]
    dtype = ENCODING_DTYPES[encoding]
    if np is not None:
        return np.ascontiguousarray(rows, dtype=np.dtype(dtype)).tobytes()
    flat = array(_TYPECODES[dtype], (value for row in rows for value in row))
    if dtype == "<f4" and sys.byteorder == "big":
        flat.byteswap()
    return flat.tobytes()


def as_lists(rows: Any) -> list:
    """Embeddings as lists of rows, whether they were decoded as an array (numpy) or as lists."""
    return rows if isinstance(rows, list) else rows.tolist()


def _decode_rows(data: Any, encoding: str, count: int, width: int) -> Any:
    """`count` rows of `width` elements from the wire: an array with numpy, else a list of lists."""
    np = _numpy()
    if encoding == "list":
        if np is not None:
            return np.asarray(data, dtype=np.float32).reshape(count, width)
        rows = [array("f", row).tolist() for row in data]
        if len(rows) != count or any(len(row) != width for row in rows):
            raise ValueError(f"embeddings: not {count} rows of {width}")
        return rows
    dtype = ENCODING_DTYPES[encoding]
    if np is not None:
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(count, width)
    flat = array(_TYPECODES[dtype])
    flat.frombytes(data)
    if len(flat) != count * width:
        raise ValueError(f"embeddings: {len(flat)} elements are not {count} rows of {width}")
    if dtype == "<f4" and sys.byteorder == "big":
        flat.byteswap()
    return [flat[i * width:(i + 1) * width].tolist() for i in range(count)]


@dataclass(frozen=True)
class EmbedReply:
    """`embeddings`, in input order: float32 (count, dimension) for float32 and list; int8/uint8
    (count, dimension); binary/ubinary (count, dimension / 8), the packed sign bits. A numpy array
    where numpy is installed, else a list of rows (lists of floats or ints)."""

    embeddings: Any
    dimension: int
    model: str
    tokens: int
    encoding: str = "float32"
    fingerprint: str | None = None  # the embedding model's (health)
    quantization: str | None = None  # int8/uint8: the map's name ("fixed" or "calibrated:<id>")

    @property
    def count(self) -> int:
        return len(self.embeddings)

    def to_wire(self) -> dict:
        body = {"embeddings": encode_rows(self.embeddings, self.encoding), "dimension": self.dimension,
                "count": self.count, "encoding": self.encoding, "model": self.model, "tokens": self.tokens,
                "fingerprint": self.fingerprint}
        if self.quantization is not None:
            body["quantization"] = self.quantization
        return body

    @classmethod
    def from_wire(cls, body: dict) -> "EmbedReply":
        count, dim = body["count"], body["dimension"]
        encoding = body.get("encoding", "float32")
        vectors = _decode_rows(body["embeddings"], encoding, count, row_bytes(encoding, dim))
        return cls(vectors, dim, body["model"], body["tokens"], encoding, body.get("fingerprint"),
                   body.get("quantization"))


def top_indices(scores, top_n: int) -> list[int]:
    """Indices by descending score, ties by index, at most `top_n`."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_n]


@dataclass(frozen=True)
class RerankReply:
    scores: list[float]  # one per document, in document order
    model: str
    tokens: int
    fingerprint: str | None = None  # the reranker's (health)
    top: list[int] | None = None  # with top_n: document indices by descending score

    def to_wire(self) -> dict:
        body = {"scores": [float(s) for s in self.scores], "model": self.model, "tokens": self.tokens,
                "fingerprint": self.fingerprint}
        if self.top is not None:
            body["top"] = self.top
        return body

    @classmethod
    def from_wire(cls, body: dict) -> "RerankReply":
        return cls(list(body["scores"]), body["model"], body["tokens"], body.get("fingerprint"), body.get("top"))


@dataclass(frozen=True)
class ModelHealth:
    name: str | None
    enabled: bool
    loaded: bool
    dimension: int | None = None  # embedding only: the default output dimension
    max_dimension: int | None = None  # embedding only
    fingerprint: str | None = None  # of the loaded model's files; nil until loaded
    quantization: str | None = None  # embedding only: int8/uint8's map ("fixed" or "calibrated:<id>")
    calibrated_dimensions: list[int] | None = None  # embedding only: the dimensions a calibration covers
    weights: str | None = None  # bfloat16, float32, float16 (unquantized), int8, nf4, fp8 or w8a8; nil until loaded
    memory_bytes: int | None = None  # what its weights hold on its device; nil until loaded
    memory_estimate_bytes: int | None = None  # what the start estimated from its files; nil if not estimated

    def to_wire(self, with_dimensions: bool) -> dict:
        body = {"name": self.name, "enabled": self.enabled, "loaded": self.loaded, "fingerprint": self.fingerprint,
                "weights": self.weights, "memory_bytes": self.memory_bytes,
                "memory_estimate_bytes": self.memory_estimate_bytes}
        if with_dimensions:
            body.update(dimension=self.dimension, max_dimension=self.max_dimension,
                        quantization=self.quantization, calibrated_dimensions=self.calibrated_dimensions)
        return body

    @classmethod
    def from_wire(cls, body: dict | None) -> "ModelHealth":
        body = body or {}
        return cls(body.get("name"), bool(body.get("enabled")), bool(body.get("loaded")),
                   body.get("dimension"), body.get("max_dimension"), body.get("fingerprint"),
                   body.get("quantization"), body.get("calibrated_dimensions"), body.get("weights"),
                   body.get("memory_bytes"), body.get("memory_estimate_bytes"))


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
    # step (str/nil), total_s, import_s, weights_s, fingerprint_s, warmup_s, memory_bytes, memory_estimate_bytes
    load: dict = field(default_factory=dict)
    # Every model served, loaded or not: name, task, state, default, source, fingerprint, idle_s,
    # active, memory_bytes, memory_estimate_bytes, weights, max_length, max_dimension, keep_alive_s,
    # error, loads, unloads (PROTOCOL.md).
    models: list = field(default_factory=list)
    load_mode: str = "at-start"  # at-start | on-demand
    # Admitted, unanswered work by priority: {"interactive": {"inputs", "tokens"}, "batch": {...}}
    queues: dict = field(default_factory=dict)
    # The daemon's per-request limits (config.Limits): clients refuse a payload over max_message_bytes
    # themselves, since the socket drops one far past it without an answer.
    limits: dict = field(default_factory=dict)
    # Quantized models kept as converted (weights_cache.py): bytes, entries, writing; None when off.
    weights_cache: dict | None = None

    def to_wire(self) -> dict:
        return {"status": self.status, "version": self.version, "protocol": self.protocol,
                "uptime_s": round(self.uptime_s, 3), "queue_depth": self.queue_depth,
                "queued_tokens": self.queued_tokens, "device": self.device, "dtype": self.dtype,
                "embedding": self.embedding.to_wire(True), "reranker": self.reranker.to_wire(False),
                "stats": self.stats, "load": self.load, "models": self.models, "load_mode": self.load_mode,
                "queues": self.queues, "limits": self.limits, "weights_cache": self.weights_cache}

    @classmethod
    def from_wire(cls, body: dict) -> "HealthReply":
        return cls(status=str(body.get("status")), version=str(body.get("version")),
                   uptime_s=float(body.get("uptime_s", 0.0)), queue_depth=int(body.get("queue_depth", 0)),
                   queued_tokens=int(body.get("queued_tokens", 0)), device=body.get("device"),
                   dtype=body.get("dtype"), embedding=ModelHealth.from_wire(body.get("embedding")),
                   reranker=ModelHealth.from_wire(body.get("reranker")), stats=dict(body.get("stats") or {}),
                   protocol=int(body.get("protocol", PROTOCOL_VERSION)), load=dict(body.get("load") or {}),
                   models=list(body.get("models") or []), load_mode=str(body.get("load_mode") or "at-start"),
                   queues=dict(body.get("queues") or {}), limits=dict(body.get("limits") or {}),
                   weights_cache=body.get("weights_cache"))


_NEWER_METRICS = ("models", "status", "priorities", "preemptions")  # fields older daemons do not send


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
    # Per model name: batches, batched_inputs, forward_s, loads, unloads, load_s, state (newer daemons).
    models: dict = field(default_factory=dict)
    status: str = ""  # loading | ready | draining, as health says ("" from older daemons)
    # Per priority (interactive, batch): batches, batched_inputs, forward_s, queued_inputs,
    # queued_tokens (newer daemons); preemptions: batch forwards paused for interactive work.
    priorities: dict = field(default_factory=dict)
    preemptions: int = 0

    def to_wire(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_wire(cls, body: dict) -> "MetricsReply":
        return cls(**{name: body[name] for name in cls.__dataclass_fields__ if name not in _NEWER_METRICS},
                   models=dict(body.get("models") or {}), status=str(body.get("status") or ""),
                   priorities=dict(body.get("priorities") or {}), preemptions=int(body.get("preemptions") or 0))


Reply = EmbedReply | RerankReply | HealthReply | MetricsReply


def encode_reply(request_id: Any, reply: Reply) -> bytes:
    return pack({"id": request_id, "ok": True, **reply.to_wire()})


def encode_error(request_id: Any, error: RequestError) -> bytes:
    return pack({"id": request_id, "ok": False, "error": error.to_wire()})


def decode_reply(data: bytes) -> dict:
    return unpack(data)


def checked(reply: dict) -> dict:
    """The reply map when it is a success; else DaemonError (ModelMismatch) with its code and message."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        code, message = str(error.get("code", ErrorCode.INTERNAL.value)), str(error.get("message", ""))
        if code == ErrorCode.MODEL_MISMATCH.value:
            raise ModelMismatch(message, error.get("expected"), error.get("actual"))
        if code == ErrorCode.UNKNOWN_MODEL.value:
            served = error.get("served")
            raise UnknownModel(message, error.get("model"), [str(n) for n in served] if isinstance(served, list) else [])
        raise DaemonError(code, message)
    return reply


# -- request builders (the clients' side) ----------------------------------------------------------
def _optional(**fields) -> dict:
    """The fields that are set: a request that uses no newer field reads the same to an older daemon."""
    return {name: value for name, value in fields.items() if value is not None}


def embed_request(inputs: list, instruction: str | None = None, dimension: int | None = None,
                  normalize: bool = True, encoding: str | None = None,
                  expect_fingerprint: str | None = None, model: str | None = None,
                  priority: str | None = None) -> dict:
    return {"op": "embed", "inputs": list(inputs), "instruction": instruction, "dimension": dimension,
            "normalize": normalize, **_optional(encoding=encoding, expect_fingerprint=expect_fingerprint, model=model,
                                                priority=_checked_priority(priority))}


def rerank_request(query: Any, documents: list, instruction: str | None = None, top_n: int | None = None,
                   expect_fingerprint: str | None = None, model: str | None = None,
                   priority: str | None = None) -> dict:
    return {"op": "rerank", "query": query, "documents": list(documents), "instruction": instruction,
            **_optional(top_n=top_n, expect_fingerprint=expect_fingerprint, model=model,
                        priority=_checked_priority(priority))}


def _checked_priority(priority: str | None) -> str | None:
    """A client's priority as sent: refused before sending when the protocol knows no such one, and
    left out when it is the default (so that an interactive request reads the same to a daemon from
    before priorities)."""
    if priority is not None and priority not in PRIORITIES:
        raise ValueError(f"priority: expected {' or '.join(PRIORITIES)}, not {priority!r}")
    return None if priority == INTERACTIVE else priority


def refuses_priority(payload: dict, reply: dict) -> bool:
    """Whether `reply` is a daemon from before priorities refusing `payload`'s priority field (the
    clients then send it again without: an older daemon runs everything as interactive)."""
    if "priority" not in payload or reply.get("ok"):
        return False
    error = reply.get("error") or {}
    return (error.get("code") == ErrorCode.INVALID_REQUEST.value
            and re.search(r"unknown field\(s\) (.*, )?priority(,|$)", str(error.get("message", ""))) is not None)


def without_priority(payload: dict) -> dict:
    return {key: value for key, value in payload.items() if key != "priority"}


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
