"""The model thread: it loads the models, owns them, and runs queued requests one batch at a time.

The socket loop only validates and enqueues (and answers `health` itself), so a long forward never
delays it. Results leave through a `reply` callback that is safe to call from this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import __version__
from .config import DaemonConfig
from .errors import ErrorCode, RequestError
from .protocol import EmbedRequest, RerankRequest, error_reply, ok_reply

log = logging.getLogger(__name__)

Reply = Callable[[list, bytes], None]  # (envelope frames, payload)


class LoadFailed(Exception):
    """Raised by `wait_loaded` when a model could not be loaded; the message is one line."""


@dataclass
class Job:
    envelope: list
    request: EmbedRequest | RerankRequest
    size: int  # inputs (embed) or documents (rerank): the unit of queue accounting
    queued_at: float = field(default_factory=time.monotonic)


class Engine:
    def __init__(self, config: DaemonConfig, reply: Reply):
        self.config = config
        self.reply = reply
        self.embedding = None
        self.reranker = None
        self.state = "loading"  # loading -> ready -> draining; or failed
        self.load_error: str | None = None
        self.started_at = time.monotonic()
        self.max_queued_inputs = config.limits.max_queued_inputs
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._queued_inputs = 0
        self._busy = 0
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwen3vl-model", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def _load(self) -> None:
        from .inputs import MediaReader
        from .models import EmbeddingModel, ModelLoadError, RerankerModel

        media = MediaReader(self.config.media)
        try:
            if self.config.embedding is not None:
                log.info("loading embedding model %s", self.config.embedding.name)
                self.embedding = EmbeddingModel(self.config.embedding, media)
                self._check_dimension_setting()
            if self.config.reranker is not None:
                log.info("loading reranker model %s", self.config.reranker.name)
                self.reranker = RerankerModel(self.config.reranker, media)
            if self.config.warmup:
                for model in (self.embedding, self.reranker):
                    if model is not None:
                        model.warmup()
        except ModelLoadError as exc:
            self.load_error = str(exc)
            self.state = "failed"
        else:
            self.state = "ready"
        finally:
            self._loaded.set()

    def _check_dimension_setting(self) -> None:
        from .models import ModelLoadError

        dim = self.config.embedding_dim
        if dim is not None and not 1 <= dim <= self.embedding.hidden_size:
            raise ModelLoadError(f"embedding dimension {dim} is outside 1..{self.embedding.hidden_size} "
                                 f"for {self.embedding.name}")

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def drain(self) -> None:
        """Take no new work; queued work is still answered."""
        if self.state == "ready" or self.state == "loading":
            self.state = "draining"

    def idle(self) -> bool:
        with self._lock:
            return self._queued_inputs == 0 and self._busy == 0

    def stop(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the socket thread's side ---------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._queued_inputs

    def submit(self, envelope: list, request: EmbedRequest | RerankRequest) -> None:
        """Queue a request or raise RequestError (not loaded, bad dimension, overloaded, draining)."""
        if self.state == "draining":
            raise RequestError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down; retry on another instance")
        if self.state != "ready":
            raise RequestError(ErrorCode.NOT_LOADED, f"models are {self.state}; retry when health says ready")
        if isinstance(request, EmbedRequest):
            self._check_embed(request)
            size = len(request.inputs)
        else:
            if self.reranker is None:
                raise RequestError(ErrorCode.NOT_LOADED, "the reranker model is disabled on this daemon")
            size = len(request.documents)
        if size > self.max_queued_inputs:
            raise RequestError(ErrorCode.TOO_LARGE, f"{size} inputs exceed the queue's capacity of "
                                                    f"{self.max_queued_inputs} (max_queued_inputs)")
        with self._lock:
            if self._queued_inputs + size > self.max_queued_inputs:
                raise RequestError(ErrorCode.OVERLOADED, f"queue full ({self._queued_inputs} inputs waiting)")
            self._queued_inputs += size
        self._jobs.put(Job(envelope, request, size))

    def _check_embed(self, request: EmbedRequest) -> None:
        if self.embedding is None:
            raise RequestError(ErrorCode.NOT_LOADED, "the embedding model is disabled on this daemon")
        top = self.embedding.hidden_size
        if request.dimension is not None and request.dimension > top:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"dimension: {request.dimension} exceeds the model's {top}")

    def health(self) -> dict[str, Any]:
        emb, rr = self.config.embedding, self.config.reranker
        model = self.embedding or self.reranker
        max_dim = self.embedding.hidden_size if self.embedding is not None else None
        return {
            "status": self.state,
            "version": __version__,
            "protocol": 1,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "queue_depth": self.queue_depth,
            "device": str(model.device) if model is not None else None,
            "dtype": str(model.dtype).replace("torch.", "") if model is not None else None,
            "embedding": {"name": emb.name if emb else None, "enabled": emb is not None,
                          "loaded": self.embedding is not None,
                          "dimension": self.config.embedding_dim or max_dim, "max_dimension": max_dim},
            "reranker": {"name": rr.name if rr else None, "enabled": rr is not None,
                         "loaded": self.reranker is not None},
        }

    # -- the model thread ------------------------------------------------------------------------
    def _run(self) -> None:
        self._load()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._busy += 1
            try:
                self.reply(job.envelope, self._execute(job))
            finally:
                with self._lock:
                    self._queued_inputs -= job.size
                    self._busy -= 1

    def _execute(self, job: Job) -> bytes:
        request = job.request
        try:
            if isinstance(request, EmbedRequest):
                return self._embed(request)
            return self._rerank(request)
        except RequestError as exc:
            return error_reply(request.id, exc)
        except Exception as exc:  # a fault in the forward fails this request only
            log.exception("request failed")
            return error_reply(request.id, RequestError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {str(exc)[:200]}"))

    def _batches(self, features: list) -> list[list[int]]:
        """Indices grouped into forwards of at most max_batch_size, similar lengths together."""
        order = sorted(range(len(features)), key=lambda i: features[i].tokens)
        size = self.config.limits.max_batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _embed(self, request: EmbedRequest) -> bytes:
        import torch

        from .models import check_finite, cut_and_normalize

        model = self.embedding
        features = [model.prepare(item, request.instruction) for item in request.inputs]
        raw = torch.empty((len(features), model.hidden_size), dtype=torch.float32)
        for idx in self._batches(features):
            raw[idx] = model.embed([features[i] for i in idx])
        check_finite(raw.numpy(), [item.where for item in request.inputs])
        dimension = request.dimension or self.config.embedding_dim or model.hidden_size
        vectors = cut_and_normalize(raw, dimension, request.normalize).numpy().astype("<f4", copy=False)
        encoded = vectors.tobytes() if request.encoding == "float32" else vectors.tolist()
        return ok_reply(request.id, embeddings=encoded, dimension=dimension, count=len(features),
                        encoding=request.encoding, model=model.name, tokens=sum(f.tokens for f in features))

    def _rerank(self, request: RerankRequest) -> bytes:
        from .models import check_finite

        model = self.reranker
        features = [model.prepare(request.query, doc, request.instruction) for doc in request.documents]
        scores = np.empty(len(features), dtype=np.float64)
        for idx in self._batches(features):
            scores[idx] = model.score([features[i] for i in idx])
        check_finite(scores, [doc.where for doc in request.documents])
        return ok_reply(request.id, scores=scores.tolist(), model=model.name,
                        tokens=sum(f.tokens for f in features))
