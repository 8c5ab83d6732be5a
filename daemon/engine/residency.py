"""Which models are in memory: loaded when asked for on one loader thread, unloaded when idle past
their keep-alive, and swapped least recently used first when a memory budget cannot hold the next.

Each model is a Resident: its card (what is known without loading it), how to build it, and its
state. The engine `hold`s a model for each job before admitting it, `ensure`s it is loaded, and
`release`s it once the job is answered; a model with jobs is never unloaded, so a batch never finds
its model gone. A job whose model is not loaded waits (within its deadline) for the load the first
such job started; every other model keeps serving meanwhile, since loads run here and forwards on
the model thread. A load whose turn comes when every job that asked for it is answered is skipped.
Loading failures answer the waiting jobs with the one-line reason and leave the model `failed`
until the next request asks again.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from daemon.errors import ModelLoadError
from daemon.loading.catalog import TASKS, ModelCard, resolve
from daemon.loading.fit import size
from qwen3vl_client.errors import ErrorCode, RequestError

log = logging.getLogger(__name__)

MAX_WAIT_S = 3600.0  # the loader's longest sleep: a keep-alive of years is waited for an hour at a time
# How long a load that needs room waits for the models in use to finish their jobs (and so become
# unloadable) before it is refused; the waiting requests' own deadlines end it sooner.
ROOM_WAIT_S = 30.0

Ready = Callable[[RequestError | None], None]  # a waiting job's callback: None once loaded, else why not
Build = Callable[[Callable[..., None]], Any]  # (step) -> the loaded, warmed-up backend; ModelLoadError


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass
class Resident:
    card: ModelCard
    build: Build | None  # None: handed over loaded at start, never unloaded
    state: ModelState = ModelState.UNLOADED
    backend: Any = None
    info: Any = None  # the last load's BackendInfo (device, dtype, memory), kept once unloaded
    error: str | None = None  # why the last load failed
    active: int = 0  # admitted jobs that use it, not yet answered
    last_used: float = field(default_factory=time.monotonic)
    waiters: list[Ready] = field(default_factory=list)
    loads: int = 0
    unloads: int = 0
    load_s: float = 0.0  # all loads' seconds

    @property
    def unloadable(self) -> bool:
        return self.build is not None and self.state is ModelState.LOADED and self.active == 0


@dataclass(frozen=True)
class MemoryGate:
    """Whether one more model fits: its estimate against what the device has free now, and beside the
    models loaded against the operator's budget (both from fit.py's estimates)."""

    budget: int | None
    free: Callable[[], tuple[int, str]]  # bytes free on the device now, and how that was measured

    def refusal(self, card: ModelCard, held: list[ModelCard], device: bool = True) -> str | None:
        """Why `card` cannot load beside `held` now, or None when it fits (`device`: also against
        what the device has free now; else the budget alone)."""
        weights = card.estimate_bytes or 0
        if device:
            free, source = self.free()
            if weights + card.working_bytes > free:
                return f"{card.describe()} needs about {size(weights + card.working_bytes)} and {source}"
        if self.budget is None:
            return None
        together = sum(c.estimate_bytes or 0 for c in held) + weights + max(c.working_bytes for c in [*held, card])
        if together <= self.budget:
            return None
        beside = f" beside {', '.join(repr(c.name) for c in held)}" if held else ""
        return (f"{card.describe()} needs about {size(together)}{beside}, over --memory-budget "
                f"{size(self.budget)}")


class NoRoom(Exception):
    """A load that would not fit: refused before any weight is read."""


class Residency:
    def __init__(self, gate: MemoryGate | None = None, release_memory: Callable[[], None] | None = None,
                 on_change: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 room_wait_s: float = ROOM_WAIT_S):
        self._residents: dict[str, Resident] = {}
        self.loaded: dict[str, Any] = {}  # name -> backend; the engine reads it (a dict lookup is atomic)
        self.gate = gate
        self._release_memory = release_memory or (lambda: None)
        self._on_change = on_change or (lambda: None)
        self._clock = clock
        self._room_wait_s = room_wait_s
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()  # models to load, in the order asked
        self._thread: threading.Thread | None = None
        self._stopped = False

    # -- the models ------------------------------------------------------------------------------
    def register(self, card: ModelCard, build: Build) -> None:
        with self._cond:
            self._residents[card.key] = Resident(card, build, last_used=self._clock())

    def adopt(self, card: ModelCard, backend: Any) -> None:
        """A model loaded elsewhere (the start's loader), served until the end."""
        with self._cond:
            self._residents[card.key] = Resident(card, None, ModelState.LOADED, backend, backend.info,
                                                 last_used=self._clock(), loads=1)
            self.loaded[card.key] = backend

    def adopt_all(self, handed: dict[str, Any]) -> None:
        """Serve the backends a loader handed over until the end, by name; the first of each task is
        its default (the task: the backend's own, else the name when it names one)."""
        tasks: set[str] = set()
        for name, backend in handed.items():
            task = getattr(backend.info, "task", None) or (name if name in TASKS else TASKS[0])
            self.adopt(adopted_card(name, task, backend.info, task not in tasks), backend)
            tasks.add(task)

    def cards(self) -> list[ModelCard]:
        with self._cond:
            return [r.card for r in self._residents.values()]

    def serves(self, name: str) -> bool:
        return name in self._residents

    def resolve(self, task: str, model: str | None, fingerprint: str | None) -> ModelCard:
        return resolve(self.cards(), task, model, fingerprint)

    def state(self, name: str) -> ModelState:
        return self._residents[name].state

    # -- serving (any thread) --------------------------------------------------------------------
    def hold(self, name: str) -> None:
        """Count one more job using the model (before the job can be answered, so that its release
        never comes first): a model held is never unloaded."""
        with self._cond:
            resident = self._residents[name]
            resident.active += 1
            resident.last_used = self._clock()

    def ensure(self, name: str, ready: Ready) -> bool:
        """For a job that holds the model: True when it is loaded; else `ready` is called once it is
        (with None) or once its load failed or was refused (with the error), from the loader thread."""
        with self._cond:
            resident = self._residents[name]
            if resident.state is ModelState.LOADED:
                return True
            resident.waiters.append(ready)
            if resident.state is not ModelState.LOADING:
                resident.state = ModelState.LOADING  # waiting for its turn, then loading
                self._queue.append(name)
                self._cond.notify_all()
        self._on_change()
        return False

    def release(self, name: str) -> None:
        with self._cond:
            resident = self._residents[name]
            resident.active -= 1
            resident.last_used = self._clock()
            if resident.active == 0:
                self._cond.notify_all()  # its keep-alive starts now

    # -- the start (the engine's loading thread) -------------------------------------------------
    def load_now(self, name: str, step: Callable[..., None]) -> None:
        """Load a model on the calling thread (the start's defaults); its errors propagate."""
        resident = self._residents[name]
        with self._cond:
            resident.state = ModelState.LOADING
        began = self._clock()
        try:
            backend = resident.build(step)
        except BaseException as exc:
            with self._cond:
                resident.state, resident.error = ModelState.FAILED, str(exc)[:300] or type(exc).__name__
            raise
        self._installed(resident, backend, began)

    # -- the loader thread -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qwen3vl-models", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """No more loads or unloads (a load in progress is left to finish on its daemon thread)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except Exception:  # a bug here must not leave every later load waiting for a dead thread
                log.exception("the model loader failed; it goes on")
                time.sleep(0.1)

    def _turn(self) -> bool:
        """One round: the due keep-alive unloads, then the next load asked for; False once stopped."""
        with self._cond:
            while not self._stopped and not self._queue:
                wait = self._next_expiry()
                if wait is not None and wait <= 0:
                    break
                self._cond.wait(None if wait is None else min(wait, MAX_WAIT_S))
            if self._stopped:
                return False
            name = self._queue.popleft() if self._queue else None
            idle = [r for r in self._residents.values() if r.unloadable and self._idle_past_keep_alive(r)]
            resident = self._residents[name] if name is not None else None
            if resident is not None and resident.active == 0:  # every job that asked is answered already
                resident.state, waiters, resident.waiters = ModelState.UNLOADED, resident.waiters, []
                resident = None
            else:
                waiters = []
        for ready in waiters:
            ready(None)  # their jobs are answered: the callbacks find them closed
        for idle_one in idle:
            self._unload(idle_one, f"idle for {idle_one.card.keep_alive_s:g} s (keep-alive)")
        if resident is not None:
            self._load(resident)
        return True

    def _idle_past_keep_alive(self, resident: Resident) -> bool:
        keep = resident.card.keep_alive_s
        return keep is not None and self._clock() - resident.last_used >= keep

    def _next_expiry(self) -> float | None:
        """Seconds until the next idle model's keep-alive ends (None: none will)."""
        now = self._clock()
        ends = [r.last_used + r.card.keep_alive_s - now for r in self._residents.values()
                if r.unloadable and r.card.keep_alive_s is not None]
        return max(0.0, min(ends)) if ends else None

    def _load(self, resident: Resident) -> None:
        began = self._clock()
        card = resident.card
        try:
            self._make_room(resident)
            log.info("loading %s (asked for)", card.describe())
            backend = resident.build(lambda what, stage="weights": log.info("%s: %s", card.name, what))
        except NoRoom as exc:
            self._failed(resident, RequestError(ErrorCode.OVERLOADED, f"model: {exc}"), ModelState.UNLOADED)
            return
        except Exception as exc:  # a fault no check foresaw (not a ModelLoadError) is logged whole; the rest serve
            if not isinstance(exc, ModelLoadError):
                log.exception("loading %s failed unexpectedly", card.describe())
            reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {str(exc)[:200]}"
            self._failed(resident, RequestError(ErrorCode.NOT_LOADED, f"model: {card.describe()} could not be "
                                                                      f"loaded: {reason}"))
            return
        self._installed(resident, backend, began)

    def _installed(self, resident: Resident, backend: Any, began: float) -> None:
        seconds = self._clock() - began
        with self._cond:
            resident.state, resident.backend, resident.info, resident.error = ModelState.LOADED, backend, backend.info, None
            resident.loads += 1
            resident.load_s += seconds
            resident.last_used = self._clock()  # its keep-alive counts from here, however long the load took
            self.loaded[resident.card.key] = backend
            waiters, resident.waiters = resident.waiters, []
            self._cond.notify_all()
        log.info("%s loaded in %.1f s", resident.card.describe(), seconds)
        for ready in waiters:
            ready(None)
        self._on_change()

    def _failed(self, resident: Resident, error: RequestError, state: ModelState = ModelState.FAILED) -> None:
        log.warning("%s", error.message)
        with self._cond:
            resident.state, resident.error = state, error.message
            waiters, resident.waiters = resident.waiters, []
        for ready in waiters:
            ready(error)
        self._on_change()

    def _make_room(self, resident: Resident) -> None:
        """Unload idle models, least recently used first, until `resident` fits. When the models that
        would have to go are in use, wait for their jobs to end (while anyone still waits for this
        load, at most room_wait_s); NoRoom when it cannot fit."""
        if self.gate is None:
            return
        give_up = self._clock() + self._room_wait_s
        while True:
            with self._cond:  # loads are one at a time: only loaded models hold memory (queued ones do not)
                others = [r for r in self._residents.values() if r is not resident and r.state is ModelState.LOADED]
                idle = sorted((r for r in others if r.unloadable), key=lambda r: r.last_used)
                busy = [r for r in others if not r.unloadable and r.build is not None]
            why = self.gate.refusal(resident.card, [r.card for r in others])
            if why is None:
                return
            if idle:
                self._unload(idle[0], f"to make room for {resident.card.describe()}")
                continue
            # Hopeless when even unloading the busy ones would not do under the budget (the device's
            # free memory cannot say: they hold some of it).
            hopeless = not busy or self.gate.refusal(resident.card, [r.card for r in others if r not in busy],
                                                     device=False) is not None
            with self._cond:
                left = give_up - self._clock()
                if hopeless or left <= 0 or resident.active == 0 or self._stopped:
                    names = ", ".join(repr(r.card.name) for r in busy)
                    busy_text = (f"{names} in use for {self._room_wait_s:g} s: retry later" if busy and not hopeless
                                 else "nothing loaded could make room" if hopeless else "")
                    raise NoRoom(f"{why}; {busy_text}" if busy_text else why)
                self._cond.wait(min(left, 1.0))  # a release that ends a job notifies


    def _unload(self, resident: Resident, why: str) -> bool:
        """Drop the model (if still idle) and give its memory back; whether it was unloaded."""
        with self._cond:
            if not resident.unloadable:
                return False
            backend = resident.backend
            resident.state, resident.backend = ModelState.UNLOADED, None
            resident.unloads += 1
            del self.loaded[resident.card.key]
        del backend
        gc.collect()  # the model's modules hold reference cycles: free them now, not at the next collection
        self._release_memory()
        log.info("unloaded %s: %s", resident.card.describe(), why)
        self._on_change()
        return True

    # -- reports ---------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """Per model, what health reports."""
        now = self._clock()
        with self._cond:
            residents = list(self._residents.values())
            return [_row(r, now) for r in residents]

    def counters(self) -> dict[str, dict]:
        with self._cond:
            return {r.card.key: {"loads": r.loads, "unloads": r.unloads, "load_s": round(r.load_s, 6),
                                  "state": r.state.value} for r in self._residents.values()}


def _row(resident: Resident, now: float) -> dict:
    card, info = resident.card, resident.info
    loaded = resident.state is ModelState.LOADED
    return {"name": card.name, "task": card.task, "state": resident.state.value, "default": card.default,
            "source": card.source, "fingerprint": card.fingerprint,
            "idle_s": 0.0 if resident.active else round(max(0.0, now - resident.last_used), 3),
            "active": resident.active,
            "memory_bytes": info.memory_bytes if loaded and info is not None else 0,
            "memory_estimate_bytes": card.estimate_bytes,
            "weights": info.weights if info is not None else None,
            "max_length": card.max_length, "max_dimension": card.hidden_size,
            "keep_alive_s": card.keep_alive_s, "error": resident.error,
            "loads": resident.loads, "unloads": resident.unloads}


def adopted_card(name: str, task: str, info, default: bool) -> ModelCard:
    """The card of a backend handed over loaded (no files were read for it here)."""
    return ModelCard(name=name, task=task, source=info.name, default=default, fingerprint=info.fingerprint,
                     max_length=info.max_length, hidden_size=info.hidden_size,
                     estimate_bytes=info.memory_estimate_bytes, device=info.device, key=name)


__all__ = ["ModelState", "Resident", "Residency", "MemoryGate", "NoRoom", "adopted_card"]
