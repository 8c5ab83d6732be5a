"""The daemon without a transport: the engine, the handlers and what they share, put together from a
DaemonConfig. The socket server (server.py) serves a Core on ZeroMQ; an in-process caller
(inprocess.py, the dataset job's Ray actors) calls its handlers directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daemon.bounded import BoundedCache
from daemon.config import DaemonConfig
from daemon.engine.backends import load_model_backends, memory_gate
from daemon.engine.engine import Engine, Loader
from daemon.engine.metrics import Metrics
from daemon.engine.residency import Residency
from daemon.handlers import Context, Handler, build_handlers
from daemon.loading.preflight import hidden_size, looks_local
from daemon.loading.weights import release_freed_memory
from daemon.logs import TracebackLimiter
from daemon.outputs.cache import EmbeddingCache
from daemon.outputs.encodings import Calibration, CalibrationError, Quantizer


class StartupError(Exception):
    """The daemon cannot start (socket in use, unsafe directory, model not loadable): one line."""


def _calibration(config: DaemonConfig) -> Calibration | None:
    """The operator's int8 calibration, read once, whole, before any model loads (against a local
    embedding checkpoint's size), so that a bad file fails at once."""
    if config.int8_calibration is None:
        return None
    embedding = config.embedding
    size = hidden_size(Path(embedding.name).expanduser()) if embedding and looks_local(embedding.name) else None
    try:
        return Calibration.load(config.int8_calibration, size)
    except CalibrationError as exc:
        raise StartupError(f"--int8-calibration {exc}") from None


@dataclass
class Core:
    config: DaemonConfig
    metrics: Metrics
    tracebacks: TracebackLimiter  # internal errors' tracebacks, rate-limited
    engine: Engine
    handlers: dict[str, Handler]

    @classmethod
    def build(cls, config: DaemonConfig, loader: Loader | None = None,
              models_changed: Callable[[], None] = lambda: None) -> "Core":
        """`loader` fills the engine's backends (default: the configured models); tests pass stand-ins.
        `models_changed` is told whenever a model is loaded, unloaded or fails."""
        metrics, tracebacks = Metrics(), TracebackLimiter()
        calibration = _calibration(config)
        images = BoundedCache(config.batching.image_cache_bytes) if config.batching.image_cache_bytes > 0 else None
        models = Residency(memory_gate(config), release_freed_memory, models_changed)
        loader = loader or (lambda backends, step: load_model_backends(config, backends, step, calibration, images,
                                                                       models))
        engine = Engine(config.batching, loader, metrics, tracebacks, models)
        cache = EmbeddingCache(config.batching.cache_bytes) if config.batching.cache_bytes > 0 else None
        handlers = build_handlers(Context(config, engine, metrics, cache, Quantizer(calibration), images))
        return cls(config, metrics, tracebacks, engine, handlers)
