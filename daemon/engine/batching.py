"""Cross-request dynamic batching, apart from transport and model.

Work arrives as *units* (one embedding input, or one query-document pair) from any number of
requests. Preprocessing threads `put` units once their token ids are known; the model thread asks
`next_batch` for the next forward. A batch:

- holds units of one kind (embed or rerank), led by the oldest ready unit of the next request in a
  round robin over requests (ordered by their last service, or their arrival if not yet served), so
  every waiting request leads a batch in turn however many units another has queued;
- takes the leading request's other units first (a request stays together and completes sooner),
  then the ready units of any request whose lengths are closest to the first one, so padding stays
  small;
- respects `max_batch_size` and `max_batch_tokens` (padded tokens: size × longest);
- waits at most `max_wait_s` for more units, only while the batch is not full, and only when more are
  likely: some are still being preprocessed, or units have been arriving less than `max_wait_s` apart
  (traffic is flowing). A lone request on an idle daemon is never held.

Two priority classes, each a round robin of its own, never mixed in one batch: `interactive` units
(someone waits: a search's query) go before `batch` units (bulk re-embedding), with one exception
that keeps batch work from starving under a steady stream of queries. The share rule: while batch
work waits, it is owed `batch_share / (1 - batch_share)` seconds for every second of interactive
forwards, and every second of batch forwards pays that debt back; while the debt exceeds `slack_s`,
batch work goes first (and interactive work may not preempt it), until it is back within the slack.
So over any stretch of saturation batch work gets at least `batch_share` of the model thread's time,
and a query never waits for batch work while the queries' own time stays under that line (a query
every second of 0.5 s each, with the default share of 0.1, owes 0.06 s a query: paid by the first
layer that runs). With no batch work waiting there is nothing to owe: the debt is forgiven.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from qwen3vl_client.fields import BATCH, INTERACTIVE


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_batch_tokens: int = 32768
    max_wait_s: float = 0.0005
    window: int = 512  # ready units considered when grouping by length
    batch_share: float = 0.1  # the least share of the model thread's time waiting batch work gets
    slack_s: float = 0.5  # the batch time that may be owed before batch work goes first


# Default padded-token budget per forward. On a CPU a forward of the 2B shapes stops gaining at about
# 1000 padded tokens (bench.cpu_batch: BENCHMARKS.md), so a larger one buys nothing and only makes
# whatever waits behind it wait longer; accelerators want large batches.
CPU_BATCH_TOKENS, ACCELERATOR_BATCH_TOKENS = 1024, 32768

_seq = itertools.count()


@dataclass(eq=False)
class Unit:
    """One input's worth of model work. `payload` is the model-ready data; `owner` decides whether it
    still matters (`owner.closed`: answered, so its remaining units are not worth running), and
    carries its place in the scheduler's round robin (`owner.turn`, written by the scheduler only)."""

    kind: str
    owner: Any
    index: int
    payload: Any = None
    tokens: int = 0
    work: Any = None  # what the owner asked to be done (the engine: its Task)
    priority: str = INTERACTIVE  # its class: interactive or batch
    ready_at: float = 0.0  # when preprocessing finished
    seq: int = field(default_factory=lambda: next(_seq))

    @property
    def unwanted(self) -> bool:
        return bool(getattr(self.owner, "closed", False))


class Scheduler:
    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._ready: dict[tuple[str, str], list[Unit]] = {}  # by (priority, kind)
        self._owed = 0.0  # seconds of model time owed to waiting batch work (the share rule)
        self._preparing = 0
        self._closed = False
        self._last_put = float("-inf")
        self._flowing = False  # the last two arrivals were less than max_wait_s apart
        self._batches = 0  # batches taken so far: the clock of the round robin
        self._cond = threading.Condition()

    # -- producers -------------------------------------------------------------------------------
    def expect(self, count: int) -> None:
        """`count` units entered preprocessing (negative: left it without being put)."""
        with self._cond:
            self._preparing += count

    def put(self, unit: Unit) -> None:
        self.put_many([unit])

    def put_many(self, units: list[Unit]) -> None:
        """Several prepared units at once: a request's units arrive together and share a batch."""
        if not units:
            return
        with self._cond:
            now = time.monotonic()
            self._flowing = now - self._last_put < self.policy.max_wait_s
            self._last_put = now
            self._preparing -= len(units)
            for unit in units:
                self._ready.setdefault((unit.priority, unit.kind), []).append(unit)
                # A request joins the rotation behind every request already in it (round robin), not
                # ahead of one that was served in part.
                if getattr(unit.owner, "turn", None) is None:
                    unit.owner.turn = self._batches
            self._cond.notify()

    def close(self) -> None:
        """No more batches: units still queued are dropped (their owners are answered elsewhere)."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the model thread ------------------------------------------------------------------------
    def next_batch(self, timeout: float | None = None) -> list[Unit] | None:
        """The next batch, or None when closed (or after `timeout` with nothing ready)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._drop_unwanted()
                if self._waiting():
                    self._linger()
                    self._drop_unwanted()  # lingering may have let a request fail meanwhile
                    priority = self._class_due()
                    if priority is not None:
                        return self._take(priority)
                    continue
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def preempting_batch(self) -> list[Unit] | None:
        """At once, without waiting: the next interactive batch to run inside a paused batch-priority
        forward, when one is ready and the share rule lets it go first; else None."""
        with self._cond:
            # Called before every decoder layer: costs nothing that grows with the queues unless
            # interactive work is there to run.
            if self._closed or self._owed > self.policy.slack_s or not self._waiting(INTERACTIVE):
                return None
            self._drop_unwanted(INTERACTIVE)
            return self._take(INTERACTIVE) if self._waiting(INTERACTIVE) else None

    def charge(self, priority: str, seconds: float, batch_waiting: bool = False) -> None:
        """The model thread spent `seconds` on a forward of `priority` (the share rule's accounts);
        `batch_waiting`: a batch-priority forward was paused for it."""
        with self._cond:
            if priority == BATCH:
                self._owed = max(0.0, self._owed - seconds)
            elif batch_waiting or self._waiting(BATCH):
                share = self.policy.batch_share
                self._owed += seconds * share / (1.0 - share)
            else:
                self._owed = 0.0  # no batch work waited: nothing is owed

    @property
    def owed_s(self) -> float:
        """The model time owed to waiting batch work now."""
        return self._owed

    def _waiting(self, priority: str | None = None) -> bool:
        return any(q for (p, _), q in self._ready.items() if priority is None or p == priority)

    def _class_due(self) -> str | None:
        """Which class leads the next batch: interactive while any waits, unless batch work waits and
        is owed more than the slack."""
        interactive, batch = self._waiting(INTERACTIVE), self._waiting(BATCH)
        if not batch:
            self._owed = 0.0  # the batch work it was owed to is gone (answered, expired, dropped)
        if interactive and not (batch and self._owed > self.policy.slack_s):
            return INTERACTIVE
        return BATCH if batch else None

    def _linger(self) -> None:
        """Wait briefly for more units, while the next batch would not be full and more are likely."""
        end = time.monotonic() + self.policy.max_wait_s
        while (self._preparing > 0 or self._flowing) and not self._closed:
            priority = self._class_due()
            if priority is None or len(self._ready[self._oldest_key(priority)]) >= self.policy.max_batch_size:
                return
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _drop_unwanted(self, priority: str | None = None) -> None:
        for key, queue in self._ready.items():
            if (priority is None or key[0] == priority) and any(u.unwanted for u in queue):
                self._ready[key] = [u for u in queue if not u.unwanted]

    def _priority(self, unit: Unit) -> tuple[int, int]:
        """Round robin over requests: the one served least recently (or, never served, that arrived
        earliest) first; within it, the oldest unit."""
        return unit.owner.turn, unit.seq

    def _oldest_key(self, priority: str) -> tuple[str, str]:
        return min((q[0].seq, key) for key, q in self._ready.items() if q and key[0] == priority)[1]

    def _take(self, priority: str) -> list[Unit]:
        first = min((u for (p, _), q in self._ready.items() if p == priority for u in q), key=self._priority)
        queue = self._ready[(priority, first.kind)]
        queue.sort(key=lambda u: u.seq)
        window = [u for u in queue[:self.policy.window] if u is not first]
        by_length = sorted(window, key=lambda u: (abs(u.tokens - first.tokens), u.seq))
        # The leading request's own units first (a request stays together and completes sooner),
        # then any request's units, closest in length first.
        candidates = ([u for u in by_length if u.owner is first.owner]
                      + [u for u in by_length if u.owner is not first.owner])
        batch, longest = [first], first.tokens
        for unit in candidates:
            if len(batch) >= self.policy.max_batch_size:
                break
            widest = max(longest, unit.tokens)
            if widest * (len(batch) + 1) <= self.policy.max_batch_tokens:
                batch.append(unit)
                longest = widest
        chosen = set(map(id, batch))
        queue[:] = [u for u in queue if id(u) not in chosen]
        self._remember(batch)
        return batch

    def _remember(self, batch: list[Unit]) -> None:
        """The leading request goes to the back of the rotation; requests whose units only filled the
        batch keep their place (else a request taken in part as filler would wait a whole round)."""
        self._batches += 1
        # Behind every request that arrives while this batch runs (they are stamped _batches).
        batch[0].owner.turn = self._batches + 1
