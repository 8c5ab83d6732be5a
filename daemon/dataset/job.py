"""The dataset job: what is left to embed (Triage), how results become commits (Committer), and the
local mode, which sends the rows to running daemons with several requests in flight per daemon."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from daemon.dataset.batches import (DUPLICATE_ID, BatchOutcome, EmbedSettings, JobFailed, Transient, embed_batch, row_error,
                      with_retries)
from daemon.dataset.progress import Progress, Summary
from daemon.dataset.rows import Columns, InputFile, Row
from daemon.dataset.store import ErrorRecord, Existing, Settings, Store, StoreError
from qwen3vl_client.client import Client, DaemonError, DaemonTimeout, DaemonUnavailable
from qwen3vl_client.errors import ErrorCode

INVALID = ErrorCode.INVALID_REQUEST.value


@dataclass(frozen=True)
class JobSpec:
    input: Path
    out: Path
    columns: Columns = Columns()
    embed: EmbedSettings = EmbedSettings()
    commit_rows: int = 4096
    commit_seconds: float = 5.0
    batch_rows: int = 32  # inputs per request (local) or per actor call (Ray)
    # Bytes of inputs per request, at most (and under the daemon's max_message_bytes): a row larger
    # than this goes alone, and one larger than the daemon takes is that row's too_large.
    batch_bytes: int = 8 << 20
    in_flight: int = 4  # requests in flight per daemon (local)
    overwrite: bool = False
    retry_errors: bool = False
    retry_s: float = 120.0  # how long a batch is retried while the daemons are busy or away
    bar: bool | None = None  # None: a bar on a terminal

    def settings(self, fingerprint: str, model: str, dimension: int, quantization: str | None,
                 id_type: str) -> Settings:
        """The dataset settings of vectors made by this model for this job's requests and columns."""
        embed = self.embed
        return Settings(fingerprint, model, dimension, embed.encoding, embed.normalize, embed.instruction,
                        quantization, id_type, self.columns.describe())


class Triage:
    """Which rows this run embeds. Not those already done (committed, or in errors.jsonl); not a
    row whose id an earlier row had (an error, duplicate_id: the first is embedded); the ids all of
    one type (the dataset's, else the first row's)."""

    def __init__(self, existing: Existing):
        self.committed, self.failed = existing.ids, existing.failed
        self.id_type = existing.settings.id_type if existing.settings else None
        self.seen: dict = {}  # id -> the first row that had it
        self.skipped = 0

    def sort(self, row: Row) -> Row | ErrorRecord | None:
        """The row to embed, the error it gets, or None when it is done already."""
        first = self.seen.setdefault(row.id, row.index) if row.id is not None else row.index
        if (row.index, row.id) in self.failed or (first == row.index and row.id in self.committed):
            self.skipped += 1
            return None
        if row.error is not None:
            return row_error(row, INVALID, row.error)
        kind = "int64" if isinstance(row.id, int) else "string"
        self.id_type = self.id_type or kind
        if kind != self.id_type:
            return row_error(row, INVALID, f"id: {kind}, but this dataset's ids are {self.id_type}")
        if first != row.index:
            return row_error(row, DUPLICATE_ID, f"id: row {first} has this id; only that row is embedded")
        return row

    def pending(self, rows: Iterable[Row], error: Callable[[ErrorRecord], None]) -> Iterator[Row]:
        """The rows to embed, in order; each row that fails already goes to `error`."""
        for row in rows:
            sorted_ = self.sort(row)
            if isinstance(sorted_, ErrorRecord):
                error(sorted_)
            elif sorted_ is not None:
                yield sorted_


def pinned(spec: JobSpec, recorded: Settings | None, fingerprint: str | None) -> EmbedSettings:
    """The request fields every batch carries: the dataset's fingerprint and dimension when it has
    them (so no daemon with another model or default dimension can add to it), else the daemon's
    fingerprint. A recorded setting this run would change is refused, naming each."""
    embed = spec.embed
    if recorded is None:
        return replace(embed, expect_fingerprint=embed.expect_fingerprint or fingerprint)
    wanted = spec.settings(embed.expect_fingerprint or fingerprint or recorded.fingerprint, recorded.model,
                           embed.dimension or recorded.dimension, recorded.quantization, recorded.id_type)
    differences = recorded.differences(wanted)
    if differences:
        raise StoreError(f"{spec.out} was made with other settings: {'; '.join(differences)}; give --overwrite "
                         "to replace it, or another --out")
    return replace(embed, expect_fingerprint=recorded.fingerprint, dimension=recorded.dimension)


class Committer:
    """Collects rows and errors and commits them every `commit_rows` rows or `commit_seconds`. The
    first outcome's maker sets the dataset's settings (a new dataset); every later one must match."""

    def __init__(self, store: Store, spec: JobSpec, triage: Triage, progress: Progress,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.spec, self.triage, self.progress, self.clock = store, spec, triage, progress, clock
        self.ids: list = []
        self.vectors: list[bytes] = []
        self.errors: list[ErrorRecord] = []
        self._last = clock()

    def add_error(self, record: ErrorRecord) -> None:
        self.errors.append(record)
        self.progress.advance(0, 1)

    def add(self, outcome: BatchOutcome) -> None:
        if outcome.made_by is not None:
            self._check(outcome)
        self.ids += outcome.ids
        self.vectors += outcome.vectors
        self.errors += outcome.errors
        self.progress.advance(len(outcome.ids), len(outcome.errors))

    def _check(self, outcome: BatchOutcome) -> None:
        made = outcome.made_by
        settings = self.spec.settings(made.fingerprint or "", made.model, made.dimension, made.quantization,
                                      self.triage.id_type or "string")
        try:
            self.store.start(settings)
        except StoreError as exc:
            raise JobFailed(f"{exc}: the daemon's vectors are not the dataset's (another model or int8 map); "
                            "none of them is written") from None

    def due(self) -> bool:
        waiting = len(self.ids) + len(self.errors)
        return waiting >= self.spec.commit_rows or (waiting > 0 and self.clock() - self._last >= self.spec.commit_seconds)

    def commit(self) -> None:
        if self.ids or self.errors:
            self.store.commit(self.ids, self.vectors, self.errors)
        self.ids, self.vectors, self.errors = [], [], []
        self._last = self.clock()

    def commit_if_due(self) -> None:
        if self.due():
            self.commit()


def batches(rows: Iterable[Row], triage: Triage, committer: Committer, size: int,
            max_bytes: int) -> Iterator[list[Row]]:
    """The rows to embed in batches of `size` rows and `max_bytes` of inputs at most (a larger row
    alone); errors found on the way go to the committer."""
    return sized(triage.pending(rows, committer.add_error), size, max_bytes)


def sized(rows: Iterable[Row], size: int, max_bytes: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    held = 0
    for row in rows:
        if batch and held + row.size > max_bytes:
            yield batch
            batch, held = [], 0
        batch.append(row)
        held += row.size
        if len(batch) == size:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def batch_bytes(spec_bytes: int, health: dict) -> int:
    """The job's batch bytes, kept under the daemon's max_message_bytes (room left for the rest of
    the request)."""
    limits = health.get("limits")
    limit = limits.get("max_message_bytes") if isinstance(limits, dict) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return max(1, min(spec_bytes, limit - min(limit // 8, 64 << 10)))
    return spec_bytes


def model_fingerprint(health: dict, model: str | None) -> str | None:
    """The fingerprint of the embedding model a request names (the default one without a name)."""
    if model is None:
        return (health.get("embedding") or {}).get("fingerprint")
    for row in health.get("models") or []:
        if row.get("task") == "embedding" and row.get("name") == model:
            return row.get("fingerprint")
    return None


@dataclass
class Opened:
    store: Store
    existing: Existing
    source: InputFile
    triage: Triage
    progress: Progress


def open_job(spec: JobSpec) -> Opened:
    store = Store(spec.out)
    store.lock()
    try:
        existing = store.open(spec.overwrite, spec.retry_errors)
        source = InputFile(spec.input, spec.columns)
        source.check_columns()
        done = len(existing.ids) + len(existing.failed)
        return Opened(store, existing, source, Triage(existing), Progress(source.count(), done, bar=spec.bar))
    except BaseException:
        store.close()
        raise


def run_local(spec: JobSpec, connect: Callable[[], Client], stop: threading.Event) -> Summary:
    """Embed INPUT through the daemons `connect()` reaches: spec.in_flight requests per daemon."""
    job = open_job(spec)
    try:
        with connect() as probe:
            health = with_retries(lambda: _ready_health(probe), spec.retry_s, stop)
            fingerprint = model_fingerprint(health, spec.embed.model)
            daemons = max(1, len(probe.daemons()))
        if fingerprint is None and spec.embed.model is not None:
            served = [m.get("name") for m in health.get("models") or [] if m.get("task") == "embedding"]
            raise JobFailed(f"--model {spec.embed.model}: the daemon serves no embedding model of that name "
                            f"(it serves: {', '.join(map(str, served)) or 'none'})")
        embed = pinned(spec, job.existing.settings, fingerprint)
        committer = Committer(job.store, spec, job.triage, job.progress)
        spec = replace(spec, batch_bytes=batch_bytes(spec.batch_bytes, health))
        _pump(job, spec, embed, committer, connect, spec.in_flight * daemons, stop)
        committer.commit()
        return job.progress.close(str(spec.out), job.triage.skipped)
    finally:
        job.store.close()


def _ready_health(client: Client) -> dict:
    """The daemon's health once it is ready (its models' fingerprints known, so the very first
    request can pin one); Transient while it loads, restarts or cannot be reached."""
    try:
        health = client.health()
    except (DaemonError, DaemonTimeout, DaemonUnavailable) as exc:
        raise Transient(str(exc)) from None
    if health.get("status") != "ready":
        raise Transient(f"the daemon is {health.get('status')}")
    return health


def _pump(job: Opened, spec: JobSpec, embed: EmbedSettings, committer: Committer, connect: Callable[[], Client],
          workers: int, stop: threading.Event) -> None:
    """Keep `workers` requests in flight (and as many batches ready), committing as results come;
    on a failure, what was embedded is committed before the error goes up."""
    clients: queue.SimpleQueue[Client] = queue.SimpleQueue()
    made = [connect() for _ in range(workers)]
    for client in made:
        clients.put(client)

    def work(batch: list[Row]) -> BatchOutcome:
        client = clients.get()
        try:
            return with_retries(lambda: embed_batch(client.request, batch, embed), spec.retry_s, stop)
        finally:
            clients.put(client)

    pending: set[Future] = set()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="qwen3vl-dataset")
    try:
        for batch in batches(job.source.rows(), job.triage, committer, spec.batch_rows, spec.batch_bytes):
            if stop.is_set():
                break
            while len(pending) >= 2 * workers:
                _harvest(pending, committer, spec.commit_seconds)
            pending.add(pool.submit(work, batch))
            committer.commit_if_due()
        while pending:
            _harvest(pending, committer, spec.commit_seconds)
    except BaseException:
        stop.set()
        for future in pending:
            future.cancel()
        for future in pending:  # every batch embedded before the failure is committed
            if not future.cancelled() and future.exception() is None:
                committer.add(future.result())
        committer.commit()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for client in made:
            client.close()
    if stop.is_set():
        raise JobFailed("stopped")


def _harvest(pending: set[Future], committer: Committer, timeout: float) -> None:
    """Take the finished batches out of `pending` (each once, even when one of them failed)."""
    done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
    for future in done:
        pending.discard(future)
        committer.add(future.result())
    committer.commit_if_due()
