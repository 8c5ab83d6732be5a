"""Stand-in model backends: the engine's Backend interface without a model, for tests that run in
milliseconds. Each result is a pure function of its input, so a test can say what every slot holds."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from daemon.engine.backends import EMBEDDING, RERANKER, BackendInfo, Backend, EmbedWork, RerankWork
from daemon.errors import attempt
from qwen3vl_client.errors import input_error


@dataclass
class Prepared:
    text: str
    tokens: int


def text_of(work: Any) -> str:
    if isinstance(work, EmbedWork):
        return "".join(work.item.texts)
    if isinstance(work, RerankWork):
        return "".join(work.query.texts) + "|" + "".join(work.document.texts)
    return str(work)


class StandIn:
    """A backend whose embedding of a text is `dim` copies of its length, and whose score of a pair
    is 1 / (1 + its length). Texts containing "bad input" fail preparation with input_error; hooks
    replace preparation or the forward to make faults."""

    def __init__(self, kind: str, dim: int = 8, device: str = "cpu",
                 forward: Callable[[list], list] | None = None, prepare: Callable[[Any], Any] | None = None,
                 layers: int = 0, layer_s: float = 0.0):
        """`layers`: a forward is that many "decoder layers" of `layer_s` seconds each, with the
        engine's pause callback called before each (as the real models' hooks do)."""
        self.kind, self.dim = kind, dim
        self.layers, self.layer_s = layers, layer_s
        self.pauses = 0  # pause callbacks made before a layer
        self.info = BackendInfo(name=f"stand-in-{kind}", device=device, dtype="float32", max_length=512,
                                hidden_size=dim if kind == EMBEDDING else None)
        self.batches: list[list[str]] = []  # the texts of every forward, in order
        self._forward_hook, self._prepare_hook = forward, prepare
        self.lock = threading.Lock()

    def prepare(self, work: Any) -> Prepared:
        if self._prepare_hook is not None:
            return self._prepare_hook(work)
        text = text_of(work)
        if "bad input" in text:
            raise input_error(f"{getattr(getattr(work, 'item', None), 'where', 'input')}: a bad input")
        return Prepared(text, max(1, len(text)))

    def prepare_many(self, works: list) -> list:
        return [attempt(self.prepare, work) for work in works]

    def forward(self, batch: list[Prepared], between_layers: Callable[[], None] | None = None) -> list:
        with self.lock:
            self.batches.append([p.text for p in batch])
        for _ in range(self.layers):
            if between_layers is not None:
                self.pauses += 1
                between_layers()
            time.sleep(self.layer_s)
        if self._forward_hook is not None:
            return self._forward_hook(batch)
        return [self.value(p.text) for p in batch]

    def value(self, text: str):
        if self.kind == EMBEDDING:
            return np.full(self.dim, float(len(text)), dtype=np.float32)
        return 1.0 / (1.0 + len(text))

    def warmup(self) -> None:
        pass

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError)

    def free_memory(self) -> None:
        pass


def loader(*backends: Backend, gate: threading.Event | None = None):
    """An engine loader that installs these backends (after `gate` is set, when given)."""
    def load(into: dict, step) -> None:
        for backend in backends:
            step(f"loading {backend.info.name}")
            if gate is not None:
                gate.wait(30)
            into[backend.info.name.removeprefix("stand-in-")] = backend
    return load


__all__ = ["StandIn", "Prepared", "loader", "text_of", "EMBEDDING", "RERANKER"]
