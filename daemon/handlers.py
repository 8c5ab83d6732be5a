"""One handler per op, in a registry keyed by op name.

A handler turns a parsed request (protocol.py) into either a reply at once (health, metrics) or a Job
for the engine (embed, rerank), and a finished job's results into a typed reply. It never sees the
socket or the bytes on the wire: the server decodes before it and encodes after it. Adding an op is a
request and reply type in protocol.py and a handler here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from . import __version__
from .backends import EMBEDDING, RERANKER, EmbedWork, RerankWork
from .bounded import BoundedCache
from .cache import EmbeddingCache, cache_key
from .config import DaemonConfig
from .engine import Engine, Job, JobResult, Task
from .errors import invalid, model_mismatch
from .inputs import InputItem
from .metrics import Metrics
from .models import cut_and_normalize
from .protocol import (EmbedReply, EmbedRequest, HealthReply, HealthRequest, MetricsReply, MetricsRequest,
                       ModelHealth, RerankReply, RerankRequest, Reply, Request, top_indices)
from .quantize import PACKED, SCALED, Quantizer, quantize

# Text-only requests this small are tokenized on the socket thread: that costs less than a thread
# handoff. Bounded in characters too, so the socket thread's work never grows with a client's input.
INLINE_MAX_UNITS, INLINE_MAX_CHARS = 4, 2048
# Replies up to this many floats are encoded on the socket thread (as float32 bytes: one copy of at
# most 1 MiB; as lists, each float is a Python object, and quantized, each passes through several numpy
# steps, so far fewer); larger ones on the reply thread.
INLINE_REPLY_FLOATS, INLINE_REPLY_LIST_FLOATS = 1 << 18, 1 << 12


@dataclass
class Context:
    """What handlers work with: the settings, the engine, the counters, the embedding cache, the
    int8/uint8 quantizer and the image cache."""

    config: DaemonConfig
    engine: Engine
    metrics: Metrics
    cache: EmbeddingCache | None = None
    quantizer: Quantizer = Quantizer()
    image_cache: BoundedCache | None = None  # images' prepared pixels (models.py)


class Handler:
    """The behaviour of one op. `start` runs on the socket thread; `finish` wherever the server
    encodes the reply (the socket thread for small replies, a reply thread for large ones)."""

    op: ClassVar[str]

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def start(self, request: Request) -> Reply | Job:
        """A reply at once, or the job whose results `finish` turns into one; RequestError refuses."""
        raise NotImplementedError

    def finish(self, request: Request, job: Job, result: JobResult) -> Reply:
        raise NotImplementedError

    def small_reply(self, request: Request) -> bool:
        """Whether the reply is cheap enough to encode on the socket thread."""
        return True


def _chars(item: InputItem) -> int:
    return sum(map(len, item.texts)) + len(item.instruction or "")


def _small_text(items: tuple[InputItem, ...], instruction: str | None) -> bool:
    """Text only, and few characters in all."""
    return (all(item.is_text_only for item in items)
            and sum(map(_chars, items)) + len(instruction or "") <= INLINE_MAX_CHARS)


def estimate_tokens(item: InputItem, cap: int) -> int:
    """An upper bound on an input's tokens, known before any media is read (for admission)."""
    text = sum(len(t.encode("utf-8", "surrogatepass")) for t in item.texts) + len(item.instruction or "")
    return min(cap, 128 + text + 1800 * len(item.images) + 7680 * len(item.videos))


def _loaded(ctx: Context, kind: str, expected: str | None):
    """The backend of `kind` (RequestError `not_loaded` while loading), refusing a request that
    expects another model's fingerprint."""
    backend = ctx.engine.backend(kind)
    if expected is not None and expected != backend.info.fingerprint:
        raise model_mismatch(kind, expected, backend.info.fingerprint)
    return backend


def _job(backend, tasks: list[Task], items: tuple[InputItem, ...], text: tuple[InputItem, ...],
         request: EmbedRequest | RerankRequest, **fields) -> Job:
    """The job of `tasks`: admitted by the estimated tokens of `items` (capped by the backend's
    limit), prepared inline when few and all of `text` (with the instruction) is short text."""
    cap = backend.info.max_length + 8
    return Job(size=len(items), tasks=tasks, deadline_ms=request.deadline_ms,
               est_tokens=sum(estimate_tokens(item, cap) for item in items),
               inline=len(tasks) <= INLINE_MAX_UNITS and _small_text(text, request.instruction), **fields)


class EmbedHandler(Handler):
    op = "embed"

    def start(self, request: EmbedRequest) -> Job:
        backend = _loaded(self.ctx, EMBEDDING, request.expect_fingerprint)
        top = backend.info.hidden_size
        if request.dimension is not None and request.dimension > top:
            raise invalid(f"dimension: {request.dimension} exceeds the model's {top}")
        self._check_encoding(request)
        cache, keys, known, tasks = self.ctx.cache, {}, {}, []
        for i, item in enumerate(request.inputs):
            key = cache_key(backend.info.name, item, request.instruction) if cache else None
            hit = cache.get(key) if cache else None
            if hit is not None:
                known[i] = hit
            else:
                keys[i] = key
                tasks.append(Task(EMBEDDING, i, EmbedWork(item, request.instruction), item.where))
        return _job(backend, tasks, request.inputs, request.inputs, request, known=known, context=keys)

    def finish(self, request: EmbedRequest, job: Job, result: JobResult) -> EmbedReply:
        if self.ctx.cache is not None:
            for index, key in job.context.items():
                self.ctx.cache.put(key, result.values[index])
        raw = np.stack(result.values).astype(np.float32, copy=False)
        dimension = self._dimension(request)
        vectors = cut_and_normalize(raw, dimension, request.normalize)
        info, encoding, label = self.ctx.engine.backends[EMBEDDING].info, request.encoding, None
        if encoding in PACKED:
            vectors = quantize(vectors, encoding)
        elif encoding in SCALED:
            scale = self.ctx.quantizer.scale(dimension)
            vectors, label = quantize(vectors, encoding, scale), scale.label
        return EmbedReply(vectors, dimension, info.name, result.tokens, encoding, info.fingerprint, label)

    def _check_encoding(self, request: EmbedRequest) -> None:
        """What the compact encodings need of the output dimension, refused before any work."""
        dimension = self._dimension(request)
        if request.encoding in PACKED and dimension % 8:
            raise invalid(f"dimension: {request.encoding} packs 8 components per byte; {dimension} is not a "
                          "multiple of 8")
        if request.encoding in SCALED and self.ctx.quantizer.scale(dimension) is None:
            covered = ", ".join(map(str, self.ctx.quantizer.covered()))
            raise invalid(f"dimension: the operator's int8 calibration has no ranges for dimension {dimension} "
                          f"(it covers {covered}); ask for one of those, or float32")

    def small_reply(self, request: EmbedRequest) -> bool:
        floats = len(request.inputs) * self._dimension(request)
        return floats <= (INLINE_REPLY_FLOATS if request.encoding == "float32" else INLINE_REPLY_LIST_FLOATS)

    def _dimension(self, request: EmbedRequest) -> int:
        full = self.ctx.engine.backends[EMBEDDING].info.hidden_size
        return request.dimension or self.ctx.config.embedding_dim or full


class RerankHandler(Handler):
    op = "rerank"

    def start(self, request: RerankRequest) -> Job:
        backend = _loaded(self.ctx, RERANKER, request.expect_fingerprint)
        tasks = [Task(RERANKER, i, RerankWork(request.query, doc, request.instruction), doc.where)
                 for i, doc in enumerate(request.documents)]
        return _job(backend, tasks, request.documents, (request.query, *request.documents), request)

    def finish(self, request: RerankRequest, job: Job, result: JobResult) -> RerankReply:
        info, scores = self.ctx.engine.backends[RERANKER].info, [float(s) for s in result.values]
        top = top_indices(scores, request.top_n) if request.top_n is not None else None
        return RerankReply(scores, info.name, result.tokens, info.fingerprint, top)


class HealthHandler(Handler):
    """Answered at once by the socket loop, even while a long batch runs."""

    op = "health"

    def start(self, request: HealthRequest) -> HealthReply:
        engine, config, cache = self.ctx.engine, self.ctx.config, self.ctx.cache
        status = engine.status()
        embedding, reranker = engine.backends.get(EMBEDDING), engine.backends.get(RERANKER)
        first = embedding or reranker
        max_dim = embedding.info.hidden_size if embedding is not None else None
        emb, rr, quantizer = config.embedding, config.reranker, self.ctx.quantizer
        return HealthReply(
            status=status.state.value, version=__version__, uptime_s=status.uptime_s,
            queue_depth=status.queue_depth, queued_tokens=status.queued_tokens,
            device=first.info.device if first is not None else None,
            dtype=first.info.dtype if first is not None else None,
            embedding=ModelHealth(emb.name if emb else None, emb is not None, embedding is not None,
                                  config.embedding_dim or max_dim, max_dim, _fingerprint(embedding),
                                  quantizer.label if emb else None, (quantizer.covered() or None) if emb else None,
                                  **_memory(embedding)),
            reranker=ModelHealth(rr.name if rr else None, rr is not None, reranker is not None,
                                 fingerprint=_fingerprint(reranker), **_memory(reranker)),
            stats={**{k: round(v, 6) for k, v in self.ctx.metrics.batching().items()},
                   "cache_hits": cache.hits if cache else 0, "cache_misses": cache.misses if cache else 0,
                   "cache_bytes": cache.size_bytes if cache else 0, **_image_cache(self.ctx.image_cache)},
            load={**{key: round(value, 3) if isinstance(value, float) else value
                     for key, value in asdict(engine.load_report()).items()}, **memory_totals(engine.backends)},
        )


def _image_cache(cache: BoundedCache | None) -> dict:
    return {"image_cache_hits": cache.hits if cache else 0, "image_cache_misses": cache.misses if cache else 0,
            "image_cache_bytes": cache.size_bytes if cache else 0}


def _fingerprint(backend) -> str | None:
    return backend.info.fingerprint if backend is not None else None


def _memory(backend) -> dict:
    if backend is None:
        return {}
    info = backend.info
    return {"weights": info.weights, "memory_bytes": info.memory_bytes,
            "memory_estimate_bytes": info.memory_estimate_bytes}


def memory_totals(backends: dict) -> dict:
    """The loaded models' memory, measured and as estimated before loading (None where not estimated)."""
    infos = [backend.info for backend in backends.values()]
    estimates = [info.memory_estimate_bytes for info in infos]
    return {"memory_bytes": sum(info.memory_bytes for info in infos) if infos else None,
            "memory_estimate_bytes": sum(estimates) if infos and None not in estimates else None}


class MetricsHandler(Handler):
    op = "metrics"

    def start(self, request: MetricsRequest) -> MetricsReply:
        status = self.ctx.engine.status()
        return MetricsReply(**self.ctx.metrics.to_wire(), queue_depth=status.queue_depth,
                            queued_tokens=status.queued_tokens, uptime_s=status.uptime_s)


HANDLERS: dict[str, type[Handler]] = {h.op: h for h in (EmbedHandler, RerankHandler, HealthHandler, MetricsHandler)}


def build_handlers(ctx: Context) -> dict[str, Handler]:
    return {op: cls(ctx) for op, cls in HANDLERS.items()}

