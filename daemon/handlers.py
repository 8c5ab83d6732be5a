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

from daemon import __version__
from daemon.bounded import BoundedCache
from daemon.config import DaemonConfig
from daemon.engine.backends import EMBEDDING, RERANKER, EmbedWork, RerankWork, weights_cache
from daemon.engine.engine import Engine, Job, JobResult, Task
from daemon.engine.metrics import Metrics
from daemon.loading.catalog import ModelCard
from daemon.models import cut_and_normalize
from daemon.outputs.cache import EmbeddingCache, cache_key
from daemon.outputs.encodings import Quantizer, quantize
from qwen3vl_client.errors import invalid
from qwen3vl_client.fields import PACKED, SCALED
from qwen3vl_client.inputs import InputItem
from qwen3vl_client.protocol import (EmbedReply, EmbedRequest, HealthReply, HealthRequest, MetricsReply,
                                     MetricsRequest, ModelHealth, Reply, Request, RerankReply, RerankRequest,
                                     top_indices)

FIXED = Quantizer()  # the fixed int8/uint8 scale for unit vectors

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

    def small_reply(self, request: Request, job: Job) -> bool:
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


def _card(ctx: Context, task: str, request: EmbedRequest | RerankRequest) -> ModelCard:
    """The model the request gets (by `model`, else by expect_fingerprint, else the default), or
    the RequestError that refuses it: loading or draining, unknown_model, model_mismatch."""
    ctx.engine.check_open()
    return ctx.engine.models.resolve(task, request.model, request.expect_fingerprint)


def _job(card: ModelCard, tasks: list[Task], items: tuple[InputItem, ...], text: tuple[InputItem, ...],
         request: EmbedRequest | RerankRequest, **fields) -> Job:
    """The job of `tasks`: admitted by the estimated tokens of `items` (capped by the model's
    limit), prepared inline when few and all of `text` (with the instruction) is short text."""
    cap = card.max_length + 8
    return Job(size=len(items), tasks=tasks, deadline_ms=request.deadline_ms, priority=request.priority,
               est_tokens=sum(estimate_tokens(item, cap) for item in items),
               inline=len(tasks) <= INLINE_MAX_UNITS and _small_text(text, request.instruction), **fields)


@dataclass(frozen=True)
class EmbedJob:
    """What the embed handler keeps of a job for its reply: the model, and each computed input's cache key."""

    card: ModelCard
    keys: dict


class EmbedHandler(Handler):
    op = "embed"

    def start(self, request: EmbedRequest) -> Job:
        card = _card(self.ctx, EMBEDDING, request)
        top = card.hidden_size
        if request.dimension is not None and top is not None and request.dimension > top:
            raise invalid(f"dimension: {request.dimension} exceeds the model's {top}")
        self._check_encoding(request, card)
        cache, keys, known, tasks = self.ctx.cache, {}, {}, []
        for i, item in enumerate(request.inputs):
            # Keyed by the model and its fingerprint: two models never share vectors, not even two of
            # one fingerprint (the same files with another max length or dtype).
            key = cache_key(f"{card.key}\t{card.fingerprint}", item, request.instruction) if cache else None
            hit = cache.get(key) if cache else None
            if hit is not None:
                known[i] = hit
            else:
                keys[i] = key
                tasks.append(Task(card.key, i, EmbedWork(item, request.instruction), item.where))
        return _job(card, tasks, request.inputs, request.inputs, request, known=known, context=EmbedJob(card, keys))

    def finish(self, request: EmbedRequest, job: Job, result: JobResult) -> EmbedReply:
        card = job.context.card
        if self.ctx.cache is not None:
            for index, key in job.context.keys.items():
                self.ctx.cache.put(key, result.values[index])
        raw = np.stack(result.values).astype(np.float32, copy=False)
        dimension = self._dimension(request, card, raw.shape[1])
        vectors = cut_and_normalize(raw, dimension, request.normalize)
        encoding, label = request.encoding, None
        if encoding in PACKED:
            vectors = quantize(vectors, encoding)
        elif encoding in SCALED:
            scale = self._quantizer(card).scale(dimension)
            vectors, label = quantize(vectors, encoding, scale), scale.label
        return EmbedReply(vectors, dimension, card.source, result.tokens, encoding, card.fingerprint, label)

    def _quantizer(self, card: ModelCard) -> Quantizer:
        """The operator's int8 calibration for the model it was made with; the fixed scale for others."""
        calibration = self.ctx.quantizer.calibration
        return self.ctx.quantizer if calibration is None or calibration.fingerprint == card.fingerprint else FIXED

    def _check_encoding(self, request: EmbedRequest, card: ModelCard) -> None:
        """What the compact encodings need of the output dimension, refused before any work."""
        dimension = self._dimension(request, card)
        quantizer = self._quantizer(card)
        if request.encoding in PACKED and dimension is not None and dimension % 8:
            raise invalid(f"dimension: {request.encoding} packs 8 components per byte; {dimension} is not a "
                          "multiple of 8")
        if request.encoding in SCALED and dimension is not None and quantizer.scale(dimension) is None:
            covered = ", ".join(map(str, quantizer.covered()))
            raise invalid(f"dimension: the operator's int8 calibration has no ranges for dimension {dimension} "
                          f"(it covers {covered}); ask for one of those, or float32")

    def small_reply(self, request: EmbedRequest, job: Job) -> bool:
        floats = len(request.inputs) * (self._dimension(request, job.context.card) or 4096)
        return floats <= (INLINE_REPLY_FLOATS if request.encoding == "float32" else INLINE_REPLY_LIST_FLOATS)

    def _dimension(self, request: EmbedRequest, card: ModelCard | None, full: int | None = None) -> int | None:
        """The reply's dimension: asked for, else the operator's default, else the model's full size."""
        return request.dimension or self.ctx.config.embedding_dim or (card.hidden_size if card else None) or full


class RerankHandler(Handler):
    op = "rerank"

    def start(self, request: RerankRequest) -> Job:
        card = _card(self.ctx, RERANKER, request)
        tasks = [Task(card.key, i, RerankWork(request.query, doc, request.instruction), doc.where)
                 for i, doc in enumerate(request.documents)]
        return _job(card, tasks, request.documents, (request.query, *request.documents), request, context=card)

    def finish(self, request: RerankRequest, job: Job, result: JobResult) -> RerankReply:
        card, scores = job.context, [float(s) for s in result.values]
        top = top_indices(scores, request.top_n) if request.top_n is not None else None
        return RerankReply(scores, card.source, result.tokens, card.fingerprint, top)


class HealthHandler(Handler):
    """Answered at once by the socket loop, even while a long batch runs."""

    op = "health"

    def start(self, request: HealthRequest) -> HealthReply:
        engine, config, cache = self.ctx.engine, self.ctx.config, self.ctx.cache
        status = engine.status()
        cards = {card.task: card for card in engine.models.cards() if card.default}
        emb_card, rr_card = cards.get(EMBEDDING), cards.get(RERANKER)
        loaded = dict(engine.backends)  # one look: the loader thread may change it meanwhile
        embedding, reranker = (loaded.get(c.key) if c else None for c in (emb_card, rr_card))
        first = next(iter(loaded.values()), None)
        max_dim = emb_card.hidden_size if emb_card else None
        emb, rr, quantizer = config.embedding, config.reranker, self.ctx.quantizer
        return HealthReply(
            status=status.state.value, version=__version__, uptime_s=status.uptime_s,
            queue_depth=status.queue_depth, queued_tokens=status.queued_tokens,
            device=first.info.device if first is not None else None,
            dtype=first.info.dtype if first is not None else None,
            embedding=ModelHealth(_source(emb_card, emb), emb is not None, embedding is not None,
                                  config.embedding_dim or max_dim, max_dim, _fingerprint(emb_card),
                                  quantizer.label if emb else None, (quantizer.covered() or None) if emb else None,
                                  **_memory(emb_card, embedding)),
            reranker=ModelHealth(_source(rr_card, rr), rr is not None, reranker is not None,
                                 fingerprint=_fingerprint(rr_card), **_memory(rr_card, reranker)),
            stats={**{k: round(v, 6) for k, v in self.ctx.metrics.batching().items()},
                   "cache_hits": cache.hits if cache else 0, "cache_misses": cache.misses if cache else 0,
                   "cache_bytes": cache.size_bytes if cache else 0, **_image_cache(self.ctx.image_cache)},
            load={**{key: round(value, 3) if isinstance(value, float) else value
                     for key, value in asdict(engine.load_report()).items()}, **memory_totals(loaded)},
            models=engine.models.rows(), load_mode=config.load, queues=status.queues,
            limits=asdict(config.limits), weights_cache=_weights_cache(config),
        )


def _weights_cache(config) -> dict | None:
    """The weights cache's size on disk (a directory listing: a few files), None when it is off."""
    cache = weights_cache(config)
    return cache.stats() if cache is not None else None


def _source(card: ModelCard | None, settings) -> str | None:
    return card.source if card is not None else settings.name if settings is not None else None


def _image_cache(cache: BoundedCache | None) -> dict:
    return {"image_cache_hits": cache.hits if cache else 0, "image_cache_misses": cache.misses if cache else 0,
            "image_cache_bytes": cache.size_bytes if cache else 0}


def _fingerprint(card: ModelCard | None) -> str | None:
    return card.fingerprint if card is not None else None


def _memory(card: ModelCard | None, backend) -> dict:
    """A default model's weights and memory while loaded; its estimate whenever one was made."""
    estimate = {"memory_estimate_bytes": card.estimate_bytes} if card is not None else {}
    if backend is None:
        return estimate
    info = backend.info
    return {**estimate, "weights": info.weights, "memory_bytes": info.memory_bytes}


def memory_totals(backends: dict) -> dict:
    """The loaded models' memory, measured and as estimated before loading (None where not estimated)."""
    infos = [backend.info for backend in backends.values()]
    estimates = [info.memory_estimate_bytes for info in infos]
    return {"memory_bytes": sum(info.memory_bytes for info in infos) if infos else None,
            "memory_estimate_bytes": sum(estimates) if infos and None not in estimates else None}


class MetricsHandler(Handler):
    op = "metrics"

    def start(self, request: MetricsRequest) -> MetricsReply:
        engine = self.ctx.engine
        status, wire = engine.status(), self.ctx.metrics.to_wire()
        forwards, by_priority = wire.pop("models"), wire.pop("priorities")
        empty = {"batches": 0, "batched_inputs": 0, "forward_s": 0.0}
        models = {name: {**empty, **forwards.get(name, {}), **life} for name, life in engine.models.counters().items()}
        priorities = {name: {**empty, **by_priority.get(name, {}), "queued_inputs": queue["inputs"],
                             "queued_tokens": queue["tokens"]} for name, queue in status.queues.items()}
        return MetricsReply(**wire, queue_depth=status.queue_depth, queued_tokens=status.queued_tokens,
                            uptime_s=status.uptime_s, models=models, status=status.state.value,
                            priorities=priorities, preemptions=status.preemptions)


HANDLERS: dict[str, type[Handler]] = {h.op: h for h in (EmbedHandler, RerankHandler, HealthHandler, MetricsHandler)}


def build_handlers(ctx: Context) -> dict[str, Handler]:
    return {op: cls(ctx) for op, cls in HANDLERS.items()}

