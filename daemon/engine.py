"""The engine: admission, preprocessing threads, the model thread, and request tickets.

The socket loop (its own thread) only validates and calls `submit` (and answers `health` itself), so
a long forward never delays it; `submit` does no work that grows with the size of a client's input.
Each request becomes a Ticket and one Unit per input (or per query-document pair). Units are
preprocessed on a thread pool (chunks taken round robin across requests), batched across requests by
the Scheduler, and run by the model thread (the main thread, `run`); each result lands in its ticket,
and the ticket that completes sends its reply through the `reply` callback (safe from any thread).
A ticket with a deadline that passes, or every live ticket at the drain deadline, is failed at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from . import __version__
from .batching import BatchPolicy, Scheduler, Unit
from .cache import EmbeddingCache, cache_key
from .config import DaemonConfig
from .errors import ErrorCode, RequestError
from .inputs import InputItem
from .logs import TracebackLimiter
from .metrics import Metrics
from .protocol import EmbedRequest, RerankRequest, error_reply, ok_reply

log = logging.getLogger(__name__)

Reply = Callable[[list, bytes], None]  # (envelope frames, payload)
EMBED, RERANK = "embed", "rerank"
# Text-only requests this small are tokenized on the socket thread: it costs less than a thread
# handoff. Bounded in characters too, so the socket thread's work never grows with a client's input.
INLINE_MAX_UNITS, INLINE_MAX_CHARS = 4, 2048
PREP_CHUNK = 16  # units per preprocessing task: small enough that the first forward starts early
# Default padded-token budget per forward. On a CPU, attention over padded batches grows with
# size x length^2 and batches of ~4k tokens measured fastest; accelerators want large batches.
CPU_BATCH_TOKENS, ACCELERATOR_BATCH_TOKENS = 4096, 32768


class Ticket:
    """One accepted request: collects its units' results and replies exactly once."""

    def __init__(self, engine: "Engine", envelope: list, request: EmbedRequest | RerankRequest,
                 size: int, est_tokens: int, deadline: float | None = None):
        self.engine = engine
        self.deadline = deadline  # monotonic time after which work not started is dropped
        self.turn: int | None = None  # its place in the scheduler's round robin over requests
        self.envelope = envelope
        self.request = request
        self.size = size
        self.est_tokens = est_tokens
        self.results: list[Any] = [None] * size
        self.tokens = 0
        self._remaining = size
        self._done = False
        self._lock = threading.Lock()
        self.started = time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self._done

    def fail(self, error: RequestError) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self.engine.metrics.error(error.code.value)
        self._finish(error_reply(self.request.id, error))

    def set(self, index: int, value: Any, tokens: int) -> None:
        with self._lock:
            if self._done or self.results[index] is not None:
                return
            self.results[index] = value
            self.tokens += tokens
            self._remaining -= 1
            if self._remaining:
                return
            self._done = True
        try:
            payload = self.engine.build_reply(self)
        except RequestError as exc:
            self.engine.metrics.error(exc.code.value)
            payload = error_reply(self.request.id, exc)
        else:
            op = EMBED if isinstance(self.request, EmbedRequest) else RERANK
            self.engine.metrics.done(op, time.monotonic() - self.started, self.size, self.tokens)
        self._finish(payload)

    def _finish(self, payload: bytes) -> None:
        # Reply, then release: once the engine is idle, every reply has been handed to the socket loop.
        try:
            self.engine.reply(self.envelope, payload)
        finally:
            self.engine.release(self)


def _chars(item: InputItem) -> int:
    return sum(map(len, item.texts)) + len(item.instruction or "")


class FairQueue:
    """Preprocessing chunks, handed out round robin across requests: a request with a thousand
    inputs queued cannot hold back the first chunk of a request that arrives after it."""

    def __init__(self) -> None:
        self._chunks: OrderedDict[Ticket, deque] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, ticket: Ticket, chunk: list[Unit]) -> None:
        with self._lock:
            self._chunks.setdefault(ticket, deque()).append(chunk)

    def take(self) -> list[Unit] | None:
        with self._lock:
            if not self._chunks:
                return None
            ticket, chunks = next(iter(self._chunks.items()))
            chunk = chunks.popleft()
            if chunks:
                self._chunks.move_to_end(ticket)  # its next chunk waits for every other request's
            else:
                del self._chunks[ticket]
            return chunk


def estimate_tokens(item: InputItem, cap: int) -> int:
    """An upper bound on an input's tokens, known before any media is read (for admission)."""
    text = sum(len(t.encode("utf-8", "surrogatepass")) for t in item.texts) + len(item.instruction or "")
    return min(cap, 128 + text + 1800 * len(item.images) + 7680 * len(item.videos))


class Engine:
    def __init__(self, config: DaemonConfig, reply: Reply):
        self.config = config
        self.reply = reply
        self.embedding = None
        self.reranker = None
        self.state = "loading"  # loading -> ready -> draining; or failed
        self.load_error: str | None = None
        self.loading = "starting"  # what load() is doing now, for status reports
        self.started_at = time.monotonic()
        b = config.batching
        self.scheduler = Scheduler(BatchPolicy(b.max_batch_size, b.max_batch_tokens or CPU_BATCH_TOKENS,
                                               b.max_wait_ms / 1000.0))
        self.cache = EmbeddingCache(b.cache_bytes) if b.cache_bytes > 0 else None
        self._pool = ThreadPoolExecutor(max_workers=b.prep_workers, thread_name_prefix="qwen3vl-prep")
        self._prep_queue = FairQueue()
        self._queued_inputs = 0
        self._queued_tokens = 0
        self._live: set[Ticket] = set()  # accepted, not yet answered
        self._deadlines: list[tuple[float, int, Ticket]] = []  # a heap, swept by `expire`
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self.metrics = Metrics()
        self.tracebacks = TracebackLimiter()  # internal errors' tracebacks, rate-limited

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self) -> None:
        from .inputs import MediaReader
        from .models import EmbeddingModel, ModelLoadError, RerankerModel

        media = MediaReader(self.config.media)
        try:
            if self.config.embedding is not None:
                self._step(f"loading embedding model {self.config.embedding.name}")
                self.embedding = EmbeddingModel(self.config.embedding, media)
                self._check_dimension_setting()
            if self.config.reranker is not None:
                self._step(f"loading reranker model {self.config.reranker.name}")
                self.reranker = RerankerModel(self.config.reranker, media)
            if self.config.warmup:
                for model in (self.embedding, self.reranker):
                    if model is not None:
                        self._step(f"warming up {model.name}")
                        model.warmup()
            self._step(None)
        except ModelLoadError as exc:
            self.load_error = str(exc)
            self.state = "failed"
        except _Stopped:
            log.info("stopped while loading (%s)", self.loading)
        else:
            self._size_batches()
            self.state = "ready"
        finally:
            self._loaded.set()

    def _step(self, what: str | None) -> None:
        """Between two loading steps: stop here when a SIGTERM arrived (the state is `draining`);
        else say what comes next (None: the end)."""
        if self.state == "draining":
            raise _Stopped
        if what is not None:
            self.loading = what
            log.info(what)

    def _size_batches(self) -> None:
        model = self.embedding or self.reranker
        if self.config.batching.max_batch_tokens is None and model.device.type != "cpu":
            self.scheduler.policy = replace(self.scheduler.policy, max_batch_tokens=ACCELERATOR_BATCH_TOKENS)

    def _check_dimension_setting(self) -> None:
        from .models import ModelLoadError

        dim = self.config.embedding_dim
        if dim is not None and not 1 <= dim <= self.embedding.hidden_size:
            raise ModelLoadError(f"embedding dimension {dim} is outside 1..{self.embedding.hidden_size} "
                                 f"for {self.embedding.name}")

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def drain(self) -> None:
        """Take no new work; accepted work is still answered."""
        if self.state in ("ready", "loading"):
            self.state = "draining"

    def idle(self) -> bool:
        with self._lock:
            return self._queued_inputs == 0

    def stop(self) -> None:
        """Make `run` return once the batch in progress is done; queued work is dropped."""
        self.scheduler.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def abort_all(self, error: RequestError) -> int:
        """Answer every accepted, unanswered request with `error` (the drain deadline); returns how many."""
        with self._lock:
            live = list(self._live)
        for ticket in live:
            ticket.fail(error)
        return len(live)

    def expire(self, now: float | None = None) -> None:
        """Fail the requests whose deadline has passed (called often by the socket loop)."""
        now = time.monotonic() if now is None else now
        expired = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                expired.append(heapq.heappop(self._deadlines)[2])
        for ticket in expired:
            ticket.fail(RequestError(ErrorCode.DEADLINE_EXCEEDED, f"not done within deadline_ms="
                                     f"{ticket.request.deadline_ms}; the work left was dropped"))

    # -- admission (the socket thread) ---------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._queued_inputs

    def submit(self, envelope: list, request: EmbedRequest | RerankRequest) -> None:
        """Accept a request or raise RequestError (not loaded, bad dimension, overloaded, draining)."""
        if self.state == "draining":
            raise RequestError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down; retry on another instance")
        if self.state != "ready":
            raise RequestError(ErrorCode.NOT_LOADED, f"models are {self.state}; retry when health says ready")
        if isinstance(request, EmbedRequest):
            self._check_embed(request)
            items, cap = request.inputs, self.embedding.max_length + 8
        else:
            if self.reranker is None:
                raise RequestError(ErrorCode.NOT_LOADED, "the reranker model is disabled on this daemon")
            items, cap = request.documents, self.reranker.max_length + 8
        est = sum(estimate_tokens(item, cap) for item in items)
        deadline = None if request.deadline_ms is None else time.monotonic() + request.deadline_ms / 1000.0
        ticket = Ticket(self, envelope, request, len(items), est, deadline)
        self._admit(ticket)
        if isinstance(request, EmbedRequest):
            self._start_embed(ticket, request)
        else:
            self._start_units(ticket, [Unit(RERANK, ticket, i) for i in range(len(items))])

    def _check_embed(self, request: EmbedRequest) -> None:
        if self.embedding is None:
            raise RequestError(ErrorCode.NOT_LOADED, "the embedding model is disabled on this daemon")
        top = self.embedding.hidden_size
        if request.dimension is not None and request.dimension > top:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"dimension: {request.dimension} exceeds the model's {top}")

    def _admit(self, ticket: Ticket) -> None:
        b = self.config.batching
        if ticket.size > b.max_queued_inputs:
            raise RequestError(ErrorCode.TOO_LARGE, f"{ticket.size} inputs exceed the queue's capacity of "
                                                    f"{b.max_queued_inputs} (max_queued_inputs)")
        if ticket.est_tokens > b.max_queued_tokens:
            # Even an idle daemon refuses it: one request must not own the daemon for minutes.
            raise RequestError(ErrorCode.TOO_LARGE, f"the request's ~{ticket.est_tokens} estimated tokens exceed "
                                                    f"the queue's capacity of {b.max_queued_tokens} "
                                                    "(max_queued_tokens); split it")
        with self._lock:
            if (self._queued_inputs + ticket.size > b.max_queued_inputs
                    or self._queued_tokens + ticket.est_tokens > b.max_queued_tokens):
                raise RequestError(ErrorCode.OVERLOADED, f"queue full ({self._queued_inputs} inputs, "
                                                         f"~{self._queued_tokens} tokens waiting); retry later")
            self._queued_inputs += ticket.size
            self._queued_tokens += ticket.est_tokens
            self._live.add(ticket)
            if ticket.deadline is not None:
                heapq.heappush(self._deadlines, (ticket.deadline, next(self._seq), ticket))

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self._queued_inputs -= ticket.size
            self._queued_tokens -= ticket.est_tokens
            self._live.discard(ticket)
            if ticket.deadline is not None and len(self._deadlines) > 2 * len(self._live) + 64:
                # Answered requests leave their entries behind; drop them now and then.
                self._deadlines = [d for d in self._deadlines if d[2] in self._live]
                heapq.heapify(self._deadlines)

    def _start_embed(self, ticket: Ticket, request: EmbedRequest) -> None:
        units = []
        for i, item in enumerate(request.inputs):
            key = cache_key(self.embedding.name, item, request.instruction) if self.cache else None
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                ticket.set(i, hit, 0)
            else:
                units.append(Unit(EMBED, ticket, i, key=key))
        self._start_units(ticket, units)

    def _start_units(self, ticket: Ticket, units: list[Unit]) -> None:
        """Queue a request's units for preprocessing in a few chunks, one per worker, so that they
        reach the scheduler in groups and share forwards instead of trickling in one by one.
        A small text-only request is tokenized right here instead: that costs less than a thread
        handoff and keeps the round trip short."""
        if not units:
            return
        self.scheduler.expect(len(units))
        if len(units) <= INLINE_MAX_UNITS and self._small_text(ticket.request):
            self._prepare_chunk(units)
            return
        size = min(PREP_CHUNK, -(-len(units) // self.config.batching.prep_workers))
        for start in range(0, len(units), size):
            self._prep_queue.put(ticket, units[start:start + size])
            self._pool.submit(self._prepare_next)

    @staticmethod
    def _small_text(request: EmbedRequest | RerankRequest) -> bool:
        """Text only, and few characters in all (the request has at most INLINE_MAX_UNITS inputs)."""
        items = request.inputs if isinstance(request, EmbedRequest) else (request.query, *request.documents)
        return (all(item.is_text_only for item in items)
                and sum(map(_chars, items)) + len(request.instruction or "") <= INLINE_MAX_CHARS)

    # -- preprocessing (the pool's threads) ------------------------------------------------------
    def _prepare_next(self) -> None:
        """One pool task: the next chunk in fair order (not necessarily the one queued with this task)."""
        chunk = self._prep_queue.take()
        if chunk is not None:
            self._prepare_chunk(chunk)

    def _prepare_chunk(self, units: list[Unit]) -> None:
        ready = []
        for unit in units:
            if self._prepare(unit):
                ready.append(unit)
            else:
                self.scheduler.expect(-1)
        now = time.monotonic()
        for unit in ready:
            unit.ready_at = now
        self.scheduler.put_many(ready)

    def _prepare(self, unit: Unit) -> bool:
        """Fill in the unit's model input; on failure fail its request and return False."""
        ticket = unit.owner
        if ticket.cancelled or self._expired(ticket):
            return False
        request = ticket.request
        try:
            if unit.kind == EMBED:
                unit.payload = self.embedding.prepare(request.inputs[unit.index], request.instruction)
            else:
                unit.payload = self.reranker.prepare(request.query, request.documents[unit.index], request.instruction)
        except RequestError as exc:
            ticket.fail(exc)
            return False
        except Exception as exc:  # a fault in preprocessing fails this request only
            self.tracebacks.log(log, "preprocessing failed")
            ticket.fail(RequestError(ErrorCode.INTERNAL, f"{_where(unit)}: {type(exc).__name__}: {str(exc)[:160]}"))
            return False
        unit.tokens = unit.payload.tokens
        return True

    # -- the model thread ------------------------------------------------------------------------
    def run(self) -> None:
        """Load the models (unless `load` did), then run batches until `stop`. Call it on the
        process's main thread: CPU forwards from other threads were measured 2-3x slower here
        (torch's OpenMP teams)."""
        if not self._loaded.is_set():
            self.load()
        if self.state == "failed":
            return
        while True:
            # A bounded wait, so the main thread regularly runs Python's signal handlers.
            batch = self.scheduler.next_batch(timeout=0.2)
            if batch is not None:
                self._forward(batch)
            elif self.scheduler.closed:
                return

    def _expired(self, ticket: Ticket) -> bool:
        """Whether the ticket's deadline has passed (then it is failed here, if `expire` has not yet)."""
        if ticket.deadline is None or time.monotonic() < ticket.deadline:
            return False
        self.expire()
        return True

    def _forward(self, batch: list[Unit]) -> None:
        batch = [u for u in batch if not self._expired(u.owner)]
        if not batch:
            return
        start = time.monotonic()
        try:
            values = self._run_split_on_oom(batch)
        except Exception as exc:  # a failed forward fails the requests in this batch only
            self.tracebacks.log(log, "forward failed")
            error = RequestError(ErrorCode.INTERNAL, f"forward failed: {type(exc).__name__}: {str(exc)[:160]}")
            for unit in batch:
                unit.owner.fail(error)
            return
        self.metrics.batch(len(batch), time.monotonic() - start, sum(start - u.ready_at for u in batch))
        for unit, value in zip(batch, values):
            self._deliver(unit, value)

    def _forward_once(self, batch: list[Unit]) -> list:
        if batch[0].kind == EMBED:
            return list(self.embedding.embed([u.payload for u in batch]).numpy())
        return list(self.reranker.score([u.payload for u in batch]))

    def _run_split_on_oom(self, batch: list[Unit]) -> list:
        """One forward; on out-of-memory, free what can be freed and retry in halves, down to single
        inputs, before giving up (then the error fails only this batch's requests)."""
        try:
            return self._forward_once(batch)
        except Exception as exc:
            if not _is_oom(exc) or len(batch) == 1:
                raise
            log.warning("out of memory on a batch of %d; retrying in halves", len(batch))
            _free_accelerator_memory()
            half = len(batch) // 2
            return self._run_split_on_oom(batch[:half]) + self._run_split_on_oom(batch[half:])

    def _deliver(self, unit: Unit, value: Any) -> None:
        if not np.all(np.isfinite(value)):
            unit.owner.fail(RequestError(ErrorCode.INTERNAL, f"{_where(unit)}: the model produced a non-finite "
                                                             "output (try --dtype float32)"))
            return
        if unit.kind == EMBED and self.cache is not None:
            self.cache.put(unit.key, value)
        unit.owner.set(unit.index, value, unit.tokens)

    # -- replies ---------------------------------------------------------------------------------
    def build_reply(self, ticket: Ticket) -> bytes:
        request = ticket.request
        if isinstance(request, RerankRequest):
            return ok_reply(request.id, scores=[float(s) for s in ticket.results], model=self.reranker.name,
                            tokens=ticket.tokens)
        from .models import cut_and_normalize

        raw = np.stack(ticket.results).astype(np.float32, copy=False)
        dimension = request.dimension or self.config.embedding_dim or self.embedding.hidden_size
        vectors = cut_and_normalize(raw, dimension, request.normalize).astype("<f4", copy=False)
        encoded = vectors.tobytes() if request.encoding == "float32" else vectors.tolist()
        return ok_reply(request.id, embeddings=encoded, dimension=dimension, count=ticket.size,
                        encoding=request.encoding, model=self.embedding.name, tokens=ticket.tokens)

    def metrics_snapshot(self) -> dict[str, Any]:
        with self._lock:
            queued, queued_tokens = self._queued_inputs, self._queued_tokens
        return {**self.metrics.to_wire(), "queue_depth": queued, "queued_tokens": queued_tokens,
                "uptime_s": time.monotonic() - self.started_at}

    def health(self) -> dict[str, Any]:
        emb, rr = self.config.embedding, self.config.reranker
        model = self.embedding or self.reranker
        max_dim = self.embedding.hidden_size if self.embedding is not None else None
        with self._lock:
            queued, queued_tokens = self._queued_inputs, self._queued_tokens
        return {
            "status": self.state,
            "version": __version__,
            "protocol": 1,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "queue_depth": queued,
            "queued_tokens": queued_tokens,
            "device": str(model.device) if model is not None else None,
            "dtype": str(model.dtype).replace("torch.", "") if model is not None else None,
            "embedding": {"name": emb.name if emb else None, "enabled": emb is not None,
                          "loaded": self.embedding is not None,
                          "dimension": self.config.embedding_dim or max_dim, "max_dimension": max_dim},
            "reranker": {"name": rr.name if rr else None, "enabled": rr is not None,
                         "loaded": self.reranker is not None},
            "stats": {**{k: round(v, 6) for k, v in self.metrics.batching().items()},
                      "cache_hits": self.cache.hits if self.cache else 0,
                      "cache_misses": self.cache.misses if self.cache else 0,
                      "cache_bytes": self.cache.size_bytes if self.cache else 0},
        }


class _Stopped(Exception):
    """SIGTERM arrived while loading: stop between two steps."""


def _is_oom(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _where(unit: Unit) -> str:
    request = unit.owner.request
    return (request.inputs if unit.kind == EMBED else request.documents)[unit.index].where
