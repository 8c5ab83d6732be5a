"""--ray: the dataset job as a Ray Data pipeline.

The driver (this process) plans and commits: it reads INPUT's ids, sorts the rows as the local mode
does (Triage), and commits what comes back through the same Committer, so the output, its settings,
errors.jsonl and resume are the local mode's, and OUT need only be on the driver's disk. Ray runs
the rest: read tasks read the chunks of INPUT that hold rows left to embed (INPUT must be readable
where they run: a shared volume on a cluster), and actors that hold the models in-process (the
daemon's own engine and handlers, InProcessDaemon) embed them, one actor per GPU with num_gpus=1,
or --ray-actors on CPUs. Results stream back to the driver as they are made.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any

import msgpack

from daemon.config import DaemonConfig
from daemon.dataset.batches import BatchOutcome, EmbedSettings, JobFailed, MadeBy, embed_batch, row_error, with_retries
from daemon.dataset.job import INVALID, Committer, JobSpec, model_fingerprint, open_job, pinned
from daemon.dataset.progress import Summary
from daemon.dataset.rows import Chunk, Columns, InputFile, Row
from daemon.dataset.store import ErrorRecord

READ_CHUNK_ROWS = 4096  # rows per read task


@dataclass(frozen=True)
class RayPlan:
    address: str  # local | auto | a cluster's address
    config: DaemonConfig  # the actors' models, as `serve` would load them
    actors: int  # on CPUs
    actor_cpus: float


def start_ray(address: str) -> None:
    """Join a cluster (auto, an address) or start a Ray of this machine's own (local: no dashboard,
    no usage stats); Ray's own progress bars stay off (the job has its own)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    if not ray.is_initialized():
        options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if address == "local":
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_ray(spec: JobSpec, plan: RayPlan, stop: threading.Event) -> Summary:
    job = open_job(spec)
    try:
        embed = pinned(spec, job.existing.settings, None)  # the actors pin their model's fingerprint
        committer = Committer(job.store, spec, job.triage, job.progress)
        work = _plan(job.source, job.triage, committer)
        if work:
            start_ray(plan.address)
            _stream(_pipeline(job.source, work, spec, embed, plan), committer, stop)
        committer.commit()
        return job.progress.close(str(spec.out), job.triage.skipped)
    finally:
        job.store.close()


def _plan(source: InputFile, triage, committer: Committer) -> list[dict]:
    """Each chunk of INPUT with rows left to embed, and those rows; the rows that fail already
    (no id, a duplicate, unreadable) go to the committer."""
    work = []
    for chunk in source.chunks(READ_CHUNK_ROWS):
        wanted = [row.index for row in triage.pending(source.rows(chunk, inputs=False), committer.add_error)]
        if wanted:
            work.append({"chunk": asdict(chunk), "rows": wanted})
    return work


def _pipeline(source: InputFile, work: list[dict], spec: JobSpec, embed: EmbedSettings, plan: RayPlan):
    import ray
    import ray.data

    on_gpu = plan.config.embedding.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
    resources = ({"num_gpus": 1, "concurrency": int(ray.cluster_resources()["GPU"])} if on_gpu
                 else {"num_cpus": plan.actor_cpus, "concurrency": plan.actors})
    return (ray.data.from_items(work, override_num_blocks=len(work))
            .map_batches(read_rows, batch_size=1, batch_format="pyarrow",
                         fn_kwargs={"path": str(source.path), "columns": asdict(source.columns)})
            .map_batches(EmbedActor, batch_size=spec.batch_rows, batch_format="pyarrow",
                         fn_constructor_args=(plan.config, embed, spec.retry_s), **resources))


def _stream(dataset, committer: Committer, stop: threading.Event) -> None:
    try:
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.add(outcome_of(table))
            committer.commit_if_due()
            if stop.is_set():
                raise JobFailed("stopped")
    except JobFailed:
        committer.commit()
        raise
    except Exception as exc:  # an actor's failure, as Ray wraps it: its own line
        committer.commit()
        raise JobFailed(_cause(exc)) from None


def _cause(exc: BaseException) -> str:
    """The one line that says why: a JobFailed or load error an actor raised, under Ray's wrapping."""
    seen = exc
    while seen is not None:
        if isinstance(seen, JobFailed):
            return str(seen)
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "JobFailed:" in line or "ModelLoadError:" in line:
            return line.split("Error: ", 1)[-1]
    return f"the Ray pipeline failed: {lines[-1] if lines else type(exc).__name__}"


# -- the stages (they run in Ray's workers) ------------------------------------------------------
ROW_SCHEMA_FIELDS = ("row", "id", "input", "error")


def read_rows(batch, path: str, columns: dict):
    """One work item (a chunk and the rows of it to embed) to those rows, inputs packed."""
    import pyarrow as pa

    item = batch.to_pylist()[0]
    wanted = set(item["rows"])
    chunk = Chunk(**{**item["chunk"], "row_groups": tuple(item["chunk"]["row_groups"])})
    rows = [row for row in InputFile(path, Columns(**columns)).rows(chunk) if row.index in wanted]
    return pa.table({"row": [r.index for r in rows], "id": [r.id for r in rows],
                     "input": [None if r.input is None else msgpack.packb(r.input, use_bin_type=True) for r in rows],
                     "error": [r.error for r in rows]})


class EmbedActor:
    """Holds the embedding model in-process, as the daemon does, and embeds batches of rows with
    the daemon's own request path; every request pins the dataset's fingerprint, else its own."""

    def __init__(self, config: DaemonConfig, embed: EmbedSettings, retry_s: float):
        from daemon.serving.inprocess import InProcessDaemon

        self.daemon = InProcessDaemon(config)
        self.daemon.start()
        own = model_fingerprint(self.daemon.health(), embed.model)
        self.embed = replace(embed, expect_fingerprint=embed.expect_fingerprint or own)
        self.retry_s = retry_s

    def __call__(self, batch):
        rows = [Row(r["row"], r["id"], None if r["input"] is None else msgpack.unpackb(r["input"], raw=False),
                    r["error"]) for r in batch.to_pylist()]
        good = [row for row in rows if row.error is None]
        outcome = BatchOutcome()
        if good:
            outcome = with_retries(lambda: embed_batch(self.daemon.request, good, self.embed), self.retry_s,
                                   threading.Event())
        outcome.errors += [row_error(row, INVALID, row.error) for row in rows if row.error is not None]
        return outcome_table(outcome)


def outcome_table(outcome: BatchOutcome):
    """A batch's outcome as one table: vector rows (row null) then error rows (vector null), with
    what made the vectors on every row."""
    import pyarrow as pa

    errors, made = outcome.errors, outcome.made_by or MadeBy(None, "", 0, None)
    count = len(outcome.ids) + len(errors)
    return pa.table({
        "id": outcome.ids + [e.id for e in errors],
        "vector": outcome.vectors + [None] * len(errors),
        "row": [None] * len(outcome.ids) + [e.row for e in errors],
        "code": [None] * len(outcome.ids) + [e.code for e in errors],
        "message": [None] * len(outcome.ids) + [e.message for e in errors],
        "fingerprint": [made.fingerprint] * count, "model": [made.model] * count,
        "dimension": [made.dimension] * count, "quantization": [made.quantization] * count})


def outcome_of(table) -> BatchOutcome:
    rows = table.to_pylist()
    outcome = BatchOutcome()
    for r in rows:
        if r["vector"] is not None:
            outcome.ids.append(r["id"])
            outcome.vectors.append(r["vector"])
            outcome.made_by = outcome.made_by or MadeBy(r["fingerprint"], r["model"], r["dimension"], r["quantization"])
        else:
            outcome.errors.append(ErrorRecord(r["row"], r["id"], r["code"], r["message"]))
    return outcome
