"""The engine: admission, preprocessing threads, the model thread, and jobs. No transport, no ops.

A handler turns a request into a Job: tasks, each naming the backend that runs it and the work it
does. `submit` admits the job (or raises RequestError), and calls the job's completion exactly once,
with a JobResult (one value per task, in index order) or a RequestError, from whichever thread
finished it. Tasks are preprocessed on a thread pool (chunks taken round robin across jobs), batched
across jobs by the Scheduler, and run by the model thread (the main thread, `run`). A job whose
deadline passes, or every live job at the drain deadline, is failed at once.

Preemption: a forward of batch-priority work is paused before each decoder layer (the backend calls
`between_layers`), and the model thread runs the interactive batches that are ready then (forwards
of their own, not preemptible) before letting the layer go on. The paused forward's tensors wait on
its stack untouched, so its outputs are bit-identical to an unpaused run (tests/test_preemption.py).

The engine never sees sockets, envelopes or msgpack, and never asks what op a job came from.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable

import numpy as np

from daemon.config import Batching
from daemon.engine.backends import Backend
from daemon.engine.batching import ACCELERATOR_BATCH_TOKENS, CPU_BATCH_TOKENS, BatchPolicy, Scheduler, Unit
from daemon.engine.metrics import Metrics
from daemon.engine.residency import Residency
from daemon.errors import ModelLoadError
from daemon.logs import TracebackLimiter
from qwen3vl_client.errors import ErrorCode, RequestError
from qwen3vl_client.fields import BATCH, INTERACTIVE, PRIORITIES

log = logging.getLogger(__name__)

PREP_CHUNK = 16  # tasks per preprocessing chunk: small enough that the first forward starts early


class EngineState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class Task:
    """One piece of model work: `work` for backend `kind`, whose result goes to slot `index`."""

    kind: str
    index: int
    work: Any
    where: str  # names the input in error messages (inputs[3], documents[0])


@dataclass
class Job:
    """What a handler asks of the engine. `size` results in all: those in `known` (e.g. cache hits)
    are given, the others come from `tasks`."""

    size: int
    tasks: list[Task]
    known: dict[int, Any] = field(default_factory=dict)
    est_tokens: int = 0  # an upper bound of the tokens its tasks will take (admission)
    deadline_ms: float | None = None
    inline: bool = False  # cheap enough to preprocess on the submitting thread
    context: Any = None  # the handler's own data for its reply; the engine never reads it
    priority: str = INTERACTIVE  # interactive (someone waits) or batch (bulk work that yields to it)


@dataclass(frozen=True)
class JobResult:
    values: list[Any]  # one per slot, in index order
    tokens: int  # tokens the forwards took for this job
    elapsed_s: float  # from admission to completion


Completion = Callable[[JobResult | RequestError], None]
# (backends, step(what, stage)): the loader puts the models it loads into `backends` (each is then
# served until the end), or registers them with the engine's Residency (loaded on demand).
Loader = Callable[[dict[str, Backend], Callable[..., None]], None]


class TicketState(Enum):
    OPEN = "open"
    ANSWERED = "answered"  # completed or failed: nothing more is wanted for it


_MISSING = object()


class Ticket:
    """One admitted job: collects its results and completes exactly once. On completion it is first
    released (`release(ticket)`: the engine's accounting), then `done(outcome)` is called, so whoever
    learns of the completion (a client reading its reply) finds the queue without this job. It holds
    no reference back to itself, so it is freed by reference counting once answered: a cycle would
    keep every answered job, and its inputs, until the cycle collector ran."""

    def __init__(self, job: Job, done: Completion, deadline: float | None, release: Callable[["Ticket"], None]):
        self.job = job
        self.deadline = deadline  # monotonic time after which work not started is dropped
        self.turn: int | None = None  # its place in the scheduler's round robin over jobs
        self.results: list[Any] = [_MISSING] * job.size
        for index, value in job.known.items():
            self.results[index] = value
        self.tokens = 0
        self.kinds: list[str] = []  # the models it acquired (released when it is answered)
        self._remaining = job.size - len(job.known)
        self._done, self._release = done, release
        self.state = TicketState.OPEN
        self._lock = threading.Lock()
        self.started = time.monotonic()

    @property
    def closed(self) -> bool:
        """Answered (completed or failed): its remaining units are not worth running."""
        return self.state is TicketState.ANSWERED

    def _close(self) -> bool:
        with self._lock:
            if self.state is TicketState.ANSWERED:
                return False
            self.state = TicketState.ANSWERED
            return True

    def fail(self, error: RequestError) -> bool:
        """Complete with `error`, unless already answered; returns whether this call answered."""
        if not self._close():
            return False
        self._finish(error)
        return True

    def set(self, index: int, value: Any, tokens: int) -> bool:
        """Store one result; returns True when it was the last one (the job is then complete)."""
        with self._lock:
            if self.state is TicketState.ANSWERED or self.results[index] is not _MISSING:
                return False
            self.results[index] = value
            self.tokens += tokens
            self._remaining -= 1
            if self._remaining:
                return False
            self.state = TicketState.ANSWERED
        self._finish(JobResult(self.results, self.tokens, time.monotonic() - self.started))
        return True

    def complete_if_known(self) -> bool:
        """A job whose every result was known at submission completes at once."""
        if self._remaining or not self._close():
            return False
        self._finish(JobResult(self.results, 0, time.monotonic() - self.started))
        return True

    def _finish(self, outcome: JobResult | RequestError) -> None:
        self._release(self)
        self._done(outcome)


class FairQueue:
    """Preprocessing chunks, handed out round robin across jobs: a job with a thousand inputs queued
    cannot hold back the first chunk of a job that arrives after it."""

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
                self._chunks.move_to_end(ticket)  # its next chunk waits for every other job's
            else:
                del self._chunks[ticket]
            return chunk


LOAD_POLL_S = 0.1  # how often a load in progress looks for a SIGTERM
RUN_POLL_S = 0.2  # how often the model thread, idle, lets the main thread run signal handlers
RUN_UNTIL_POLL_S = 0.01  # how soon run_until sees a job failed off the model thread (preprocessing)
LOAD_STAGES = ("import", "weights", "fingerprint", "warmup")  # where the time to READY goes


@dataclass(frozen=True)
class LoadReport:
    step: str | None  # what loading does now; None once done (or stopped)
    total_s: float  # from the engine's start to READY (so far, while loading)
    import_s: float
    weights_s: float
    fingerprint_s: float
    warmup_s: float

    def describe(self) -> str:
        return (f"import {self.import_s:.1f} s, weights {self.weights_s:.1f} s, "
                f"fingerprint {self.fingerprint_s:.2f} s, warm-up {self.warmup_s:.1f} s")


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    uptime_s: float
    queue_depth: int  # results admitted and not yet answered
    queued_tokens: int  # their estimated tokens
    queues: dict = field(default_factory=dict)  # by priority: {"inputs": n, "tokens": n}
    preemptions: int = 0  # batch-priority forwards paused for interactive work, since start


@dataclass
class _Pause:
    """A batch-priority forward in progress, as its pauses see it."""

    mark: float  # when the forward last made progress of its own (began, or resumed)
    nested_s: float = 0.0  # time spent on interactive forwards inside it
    paused: bool = False  # whether it was paused at least once


class Engine:
    def __init__(self, batching: Batching, loader: Loader, metrics: Metrics | None = None,
                 tracebacks: TracebackLimiter | None = None, models: Residency | None = None):
        self.batching = batching
        self._loader = loader
        self.models = models or Residency()  # every model served, loaded or not
        self.state = EngineState.LOADING
        self.load_error: str | None = None
        self.loading = "starting"  # what load() is doing now, for status reports
        self.load_seconds: dict[str, float] = dict.fromkeys(LOAD_STAGES, 0.0)
        self._stage: str | None = None  # the LOAD_STAGES entry whose time is being counted
        self._stage_began = 0.0
        self._loaded_after: float | None = None  # seconds from start to the end of loading
        self.started_at = time.monotonic()
        self.scheduler = Scheduler(BatchPolicy(batching.max_batch_size, batching.max_batch_tokens or CPU_BATCH_TOKENS,
                                               batching.max_wait_ms / 1000.0, batch_share=batching.batch_share))
        self._pool = ThreadPoolExecutor(max_workers=batching.prep_workers, thread_name_prefix="qwen3vl-prep")
        self._prep_queue = FairQueue()
        self._queued = {priority: [0, 0] for priority in PRIORITIES}  # admitted, unanswered: inputs, tokens
        self._pause: _Pause | None = None  # the batch-priority forward running now, if any
        self.preemptions = 0
        self._live: set[Ticket] = set()  # admitted, not yet answered
        self._deadlines: list[tuple[float, int, Ticket]] = []  # a heap, swept by `expire`
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self.metrics = metrics or Metrics()
        self.tracebacks = tracebacks or TracebackLimiter()  # internal errors' tracebacks, rate-limited

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> None:
        """Run the loader on its own thread and wait for it. A SIGTERM while it runs (the state is
        `draining`) returns within LOAD_POLL_S wherever loading is, leaving the loader behind on its
        daemon thread: a step may block for long (a weight file on a slow or hung mount, a FIFO in
        a setting's place) and loading holds nothing worth waiting for."""
        loader = threading.Thread(target=self._load, name="qwen3vl-load", daemon=True)
        loader.start()
        while not self._loaded.wait(LOAD_POLL_S):
            if self.state is EngineState.DRAINING:
                log.info("stopped while loading (%s)", self.loading)
                return

    @property
    def backends(self) -> dict[str, Backend]:
        """The models loaded now, by name."""
        return self.models.loaded

    @property
    def loader_running(self) -> bool:
        """Whether `load` returned on a SIGTERM while the loader's thread was still inside a step."""
        return not self._loaded.is_set() and self.state is EngineState.DRAINING

    def _load(self) -> None:
        try:
            handed: dict[str, Backend] = {}
            self._loader(handed, self._step)
            self.models.adopt_all(handed)
            self._step(None)
        except ModelLoadError as exc:
            self.load_error = str(exc)
            self.state = EngineState.FAILED
        except _Stopped:
            log.info("stopped while loading (%s)", self.loading)
        except Exception as exc:  # a bug or an input no check foresaw: a failed start, never a hang
            log.exception("loading failed unexpectedly (%s)", self.loading)
            self.load_error = f"loading failed while {self.loading}: {type(exc).__name__}: {str(exc)[:200]}"
            self.state = EngineState.FAILED
        else:
            self._size_batches()
            self.models.start()
            with self._lock:  # a drain that came after the last step wins
                if self.state is EngineState.LOADING:
                    self.state = EngineState.READY
        finally:
            self._loaded.set()

    def _step(self, what: str | None, stage: str = "weights") -> None:
        """Between two loading steps: stop here when a SIGTERM arrived (the state is `draining`);
        else say what comes next (None: the end), and in which stage of LOAD_STAGES its time counts."""
        now = time.monotonic()
        if self._stage is not None:
            self.load_seconds[self._stage] += now - self._stage_began
        self._stage, self._stage_began = (stage, now) if what is not None else (None, now)
        if self.state is EngineState.DRAINING:
            raise _Stopped
        if what is not None:
            self.loading = what
            log.info(what)
        else:
            self._loaded_after = now - self.started_at

    def load_report(self) -> LoadReport:
        """Where loading stands, or how long it took, by stage."""
        now = time.monotonic()
        seconds = dict(self.load_seconds)
        if self._stage is not None:  # the stage in progress, so far
            seconds[self._stage] += now - self._stage_began
        total = self._loaded_after if self._loaded_after is not None else now - self.started_at
        return LoadReport(step=self.loading if self.state is EngineState.LOADING else None, total_s=total,
                          **{f"{stage}_s": seconds[stage] for stage in LOAD_STAGES})

    def _size_batches(self) -> None:
        on_accelerator = any(card.device != "cpu" for card in self.models.cards())
        if self.batching.max_batch_tokens is None and on_accelerator:
            self.scheduler.policy = replace(self.scheduler.policy, max_batch_tokens=ACCELERATOR_BATCH_TOKENS)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def drain(self) -> None:
        """Take no new work; admitted work is still completed."""
        with self._lock:
            if self.state in (EngineState.READY, EngineState.LOADING):
                self.state = EngineState.DRAINING

    def stop(self) -> None:
        """Make `run` return once the batch in progress is done; queued work is dropped."""
        self.scheduler.close()
        self.models.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def abort_all(self, error: RequestError) -> int:
        """Fail every admitted, unanswered job with `error` (the drain deadline); returns how many."""
        with self._lock:
            live = list(self._live)
        for ticket in live:
            ticket.fail(error)
        return len(live)

    def expire(self, now: float | None = None) -> None:
        """Fail the jobs whose deadline has passed (called often by the socket loop)."""
        now = time.monotonic() if now is None else now
        expired = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                expired.append(heapq.heappop(self._deadlines)[2])
        for ticket in expired:
            ticket.fail(RequestError(ErrorCode.DEADLINE_EXCEEDED, f"not done within deadline_ms="
                                            f"{ticket.job.deadline_ms}; the work left was dropped"))

    def status(self) -> EngineStatus:
        with self._lock:
            queued, queued_tokens = self._queued_totals()
            queues = {p: {"inputs": n, "tokens": t} for p, (n, t) in self._queued.items()}
        return EngineStatus(self.state, time.monotonic() - self.started_at, queued, queued_tokens, queues,
                            self.preemptions)

    # -- admission (the submitting thread) -------------------------------------------------------
    def check_open(self) -> None:
        """The RequestError that says why no work is taken now (loading, draining), if any."""
        if self.state is EngineState.DRAINING:
            raise RequestError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down; retry on another instance")
        if self.state is not EngineState.READY:
            raise RequestError(ErrorCode.NOT_LOADED, f"models are {self.state.value}; retry when health says ready",
                               {"status": self.state.value})

    def submit(self, job: Job, done: Completion) -> Ticket:
        """Admit a job or raise RequestError (not loaded, draining, too large, overloaded). Once
        admitted, `done` is called exactly once; `submit` does no work that grows with the job's
        size unless the job is marked `inline`. Its tasks' models are acquired for its lifetime; one
        not loaded is loaded first, while the job waits within its deadline."""
        self.check_open()
        kinds = list(dict.fromkeys(task.kind for task in job.tasks))
        for kind in kinds:
            if not self.models.serves(kind):
                raise RequestError(ErrorCode.NOT_LOADED, f"the {kind} model is disabled on this daemon")
        deadline = None if job.deadline_ms is None else time.monotonic() + job.deadline_ms / 1000.0
        ticket = Ticket(job, done, deadline, self.release)
        # Held before admission, so that the job's release (its answer may come from another thread
        # at once, e.g. its deadline) can never come before: a model in use never looks idle.
        for kind in kinds:
            self.models.hold(kind)
        ticket.kinds = kinds
        try:
            self._admit(ticket)
        except BaseException:
            for kind in kinds:
                self.models.release(kind)
            raise
        if not ticket.complete_if_known():
            self._start_when_loaded(ticket, kinds)
        return ticket

    def _start_when_loaded(self, ticket: Ticket, kinds: list[str]) -> None:
        """Start the job once every model it uses is loaded (at once when they are); a model that
        cannot load fails it with the reason."""
        left, lock = [len(kinds)], threading.Lock()

        def arrived(error: RequestError | None) -> None:
            if error is not None:
                ticket.fail(error)
                return
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last and not ticket.closed:
                self._start(ticket)

        for kind in kinds:
            if self.models.ensure(kind, arrived):
                arrived(None)

    def _admit(self, ticket: Ticket) -> None:
        b = self.batching
        size, est = ticket.job.size, ticket.job.est_tokens
        if size > b.max_queued_inputs:
            raise RequestError(ErrorCode.TOO_LARGE, f"{size} inputs exceed the queue's capacity of "
                                                    f"{b.max_queued_inputs} (max_queued_inputs)")
        if est > b.max_queued_tokens:
            # Even an idle daemon refuses it: one request must not own the daemon for minutes.
            raise RequestError(ErrorCode.TOO_LARGE, f"the request's ~{est} estimated tokens exceed "
                                                    f"the queue's capacity of {b.max_queued_tokens} "
                                                    "(max_queued_tokens); split it")
        with self._lock:
            queued, queued_tokens = self._queued_totals()
            if queued + size > b.max_queued_inputs or queued_tokens + est > b.max_queued_tokens:
                raise RequestError(ErrorCode.OVERLOADED, f"queue full ({queued} inputs, "
                                                         f"~{queued_tokens} tokens waiting); retry later")
            mine = self._queued[ticket.job.priority]
            mine[0] += size
            mine[1] += est
            self._live.add(ticket)
            if ticket.deadline is not None:
                heapq.heappush(self._deadlines, (ticket.deadline, next(self._seq), ticket))

    def _queued_totals(self) -> tuple[int, int]:
        """The inputs and estimated tokens admitted and not yet answered, every class together (under _lock)."""
        return sum(n for n, _ in self._queued.values()), sum(t for _, t in self._queued.values())

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket not in self._live:
                return
            mine = self._queued[ticket.job.priority]
            mine[0] -= ticket.job.size
            mine[1] -= ticket.job.est_tokens
            self._live.discard(ticket)
            for kind in ticket.kinds:
                self.models.release(kind)
            if ticket.deadline is not None and len(self._deadlines) > 2 * len(self._live) + 64:
                # Answered jobs leave their entries behind; drop them now and then.
                self._deadlines = [d for d in self._deadlines if d[2] in self._live]
                heapq.heapify(self._deadlines)

    def _start(self, ticket: Ticket) -> None:
        """Queue a job's tasks for preprocessing in a few chunks, one per worker, so that they reach
        the scheduler in groups and share forwards instead of trickling in one by one. An `inline`
        job is prepared right here instead: that costs less than a thread handoff."""
        units = [Unit(task.kind, ticket, task.index, work=task, priority=ticket.job.priority)
                 for task in ticket.job.tasks]
        self.scheduler.expect(len(units))
        if ticket.job.inline:
            self._prepare_chunk(units)
            return
        size = min(PREP_CHUNK, -(-len(units) // self.batching.prep_workers))
        for start in range(0, len(units), size):
            self._prep_queue.put(ticket, units[start:start + size])
            self._pool.submit(self._prepare_next)

    # -- preprocessing (the pool's threads) ------------------------------------------------------
    def _prepare_next(self) -> None:
        """One pool task: the next chunk in fair order (not necessarily the one queued with this task)."""
        chunk = self._prep_queue.take()
        if chunk is not None:
            self._prepare_chunk(chunk)

    def _prepare_chunk(self, units: list[Unit]) -> None:
        """Prepare units together (each backend gets its units in one call, so that their texts are
        tokenised in one go); a unit that fails fails its own job only."""
        wanted = [u for u in units if not (u.owner.closed or self._expired(u.owner))]
        ready = []
        for kind in dict.fromkeys(u.kind for u in wanted):
            group = [u for u in wanted if u.kind == kind]
            try:
                # A job holds its models loaded until answered; a model gone was released by jobs
                # answered meanwhile, whose units are dropped below.
                results = self._backend_of(kind).prepare_many([u.work.work for u in group])
            except Exception as exc:  # a fault outside any one input: every unit of the call fails
                results = [exc] * len(group)
            for unit, result in zip(group, results):
                if self._accept(unit, result):
                    ready.append(unit)
        self.scheduler.expect(len(ready) - len(units))
        now = time.monotonic()
        for unit in ready:
            unit.ready_at = now
        self.scheduler.put_many(ready)

    def _accept(self, unit: Unit, result: Any) -> bool:
        """Take the unit's prepared input, or fail its job with the error its preparation raised."""
        if isinstance(result, RequestError):
            unit.owner.fail(result)
            return False
        if isinstance(result, Exception):  # a fault in preprocessing fails this job only
            self.tracebacks.log(log, "preprocessing failed", result)
            unit.owner.fail(RequestError(ErrorCode.INTERNAL, f"{unit.work.where}: {type(result).__name__}: "
                                                             f"{str(result)[:160]}"))
            return False
        unit.payload, unit.tokens = result, result.tokens
        return True

    # -- the model thread ------------------------------------------------------------------------
    def run(self) -> None:
        """Load the models (unless `load` did), then run batches until `stop`. Call it on the
        process's main thread: CPU forwards from other threads were measured 2-3x slower here
        (torch's OpenMP teams)."""
        if not self._loaded.is_set():
            self.load()
        if not self._loaded.is_set() or self.state is EngineState.FAILED:  # stopped while loading, or failed
            return
        # A bounded wait, so the main thread regularly runs Python's signal handlers.
        self._run_batches(lambda: False, RUN_POLL_S)

    def run_until(self, done: threading.Event) -> None:
        """Run batches on the calling thread until `done` is set or `stop`: an in-process caller
        (inprocess.py) is the model thread itself while it waits for its own job."""
        self._run_batches(done.is_set, RUN_UNTIL_POLL_S)

    def _run_batches(self, finished: Callable[[], bool], poll_s: float) -> None:
        """Forward batches as they come, looking at `finished` at least every `poll_s`, until it
        says so or the scheduler is closed."""
        while not finished():
            batch = self.scheduler.next_batch(timeout=poll_s)
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

    def _backend_of(self, kind: str) -> Backend:
        backend = self.backends.get(kind)
        if backend is None:
            raise RequestError(ErrorCode.NOT_LOADED, f"model {kind!r} is not loaded")
        return backend

    def _forward(self, batch: list[Unit], nested: bool = False) -> bool:
        """One forward of `batch`, its results given to their jobs; False when none was run (every
        unit's job already answered). A batch-priority forward (unless `nested` in another, or
        preemption is off) pauses before each decoder layer for the interactive work that is ready."""
        batch = [u for u in batch if not (u.owner.closed or self._expired(u.owner))]
        if not batch:
            return False
        kind = batch[0].kind
        backend = self.backends.get(kind)
        if backend is None:  # only answered jobs' units can outlive their model
            return False
        # Held while its forward runs, even if every job of the batch is answered meanwhile (a
        # deadline passing during a pause): a model being computed with is never unloaded.
        self.models.hold(kind)
        try:
            self._forward_on(backend, batch, nested)
        finally:
            self.models.release(kind)
        return True

    def _forward_on(self, backend: Backend, batch: list[Unit], nested: bool) -> None:
        priority = batch[0].priority
        start = time.monotonic()
        pause = _Pause(start) if priority == BATCH and self.batching.preempt and not nested else None
        if not nested:
            self._pause = pause
        try:
            values = self._run_split_on_oom(backend, batch, self._between_layers if pause else None)
        except Exception as exc:  # a failed forward fails the jobs in this batch only
            self.tracebacks.log(log, "forward failed")
            error = RequestError(ErrorCode.INTERNAL, f"forward failed: {type(exc).__name__}: {str(exc)[:160]}")
            for unit in batch:
                unit.owner.fail(error)
            return
        finally:
            if not nested:
                self._pause = None
            end = time.monotonic()
            # The share rule's accounts: a batch forward's own time (less the interactive forwards
            # inside it, charged as they ran) since its last pause; an interactive forward whole.
            self.scheduler.charge(priority, end - (pause.mark if pause else start), batch_waiting=nested)
        own_s = end - start - (pause.nested_s if pause else 0.0)
        self.metrics.batch(len(batch), own_s, sum(start - u.ready_at for u in batch), batch[0].kind, priority)
        for unit, value, ok in zip(batch, values, _finite_rows(values)):
            if ok:
                unit.owner.set(unit.index, value, unit.tokens)
            else:
                unit.owner.fail(RequestError(ErrorCode.INTERNAL, f"{unit.work.where}: the model produced a "
                                                    "non-finite output (try --dtype float32)"))

    def _between_layers(self) -> None:
        """Called by the backend before each decoder layer of a batch-priority forward (the model
        thread): run the interactive batches ready now, each whole, then let the layer go on. Never
        raises into the paused forward: a failed interactive forward fails its own jobs only."""
        pause = self._pause
        if pause is None:
            return
        now = time.monotonic()
        self.scheduler.charge(BATCH, now - pause.mark)
        pause.mark = now
        try:
            while (batch := self.scheduler.preempting_batch()) is not None:
                began = time.monotonic()
                ran = self._forward(batch, nested=True)
                pause.nested_s += time.monotonic() - began
                if ran and not pause.paused:
                    pause.paused = True
                    with self._lock:
                        self.preemptions += 1
        except Exception:  # a bug here must not fail the paused forward's jobs
            self.tracebacks.log(log, "running interactive work inside a batch forward failed")
        finally:
            pause.mark = time.monotonic()

    def _run_split_on_oom(self, backend: Backend, batch: list[Unit],
                          between_layers: Callable[[], None] | None = None) -> list:
        """One forward; on out-of-memory, free what can be freed and retry in halves, down to single
        inputs, before giving up (then the error fails only this batch's jobs)."""
        try:
            values = backend.forward([u.payload for u in batch], between_layers=between_layers)
            if len(values) != len(batch):  # else some jobs would wait forever for their results
                raise RuntimeError(f"the backend returned {len(values)} results for {len(batch)} inputs")
            return values
        except Exception as exc:
            if not backend.is_out_of_memory(exc) or len(batch) == 1:
                raise
            log.warning("out of memory on a batch of %d; retrying in halves", len(batch))
            backend.free_memory()
            half = len(batch) // 2
            return [*self._run_split_on_oom(backend, batch[:half], between_layers),
                    *self._run_split_on_oom(backend, batch[half:], between_layers)]


def _finite_rows(values) -> list[bool]:
    """Whether each result is all finite numbers: one check for the whole batch when its rows are
    alike, else row by row (a row that is not numeric at all counts as not finite)."""
    try:
        return list(np.isfinite(np.asarray(values, dtype=np.float64).reshape(len(values), -1)).all(axis=1))
    except (ValueError, TypeError):
        return [_finite(value) for value in values]


def _finite(value) -> bool:
    try:
        return bool(np.all(np.isfinite(value)))
    except TypeError:
        return False


class _Stopped(Exception):
    """SIGTERM arrived while loading: stop between two steps."""
