"""Priorities and preemption: the scheduler's classes and share rule on their own, then the engine
pausing a batch-priority forward between its layers for interactive work (stand-in backends whose
forwards are "layers" of sleeps), in milliseconds to a few seconds per test."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from daemon.backends import EMBEDDING, RERANKER, EmbedWork, RerankWork
from daemon.batching import BatchPolicy, Scheduler, Unit
from daemon.config import BATCH, INTERACTIVE, Batching, Limits, MediaPolicy
from daemon.engine import Engine, EngineState, Job, JobResult, Task
from daemon.errors import ErrorCode, RequestError
from daemon.inputs import InputItem
from daemon.protocol import parse_request
from standins import StandIn, loader


# -- the scheduler ---------------------------------------------------------------------------------
def _owner() -> SimpleNamespace:
    return SimpleNamespace(closed=False, turn=None)


def _units(count: int, priority: str, owner=None, tokens: int = 10, kind: str = "embed") -> list[Unit]:
    owner = owner or _owner()
    return [Unit(kind, owner, i, tokens=tokens, priority=priority) for i in range(count)]


def _scheduler(**policy) -> Scheduler:
    return Scheduler(BatchPolicy(**{"max_wait_s": 0.0, "max_batch_size": 4, **policy}))


def _put(s: Scheduler, units: list[Unit]) -> None:
    s.expect(len(units))
    s.put_many(units)


def test_interactive_units_lead_even_when_batch_units_came_first():
    s = _scheduler()
    _put(s, _units(8, BATCH))
    query = _owner()
    _put(s, _units(1, INTERACTIVE, owner=query))
    batch = s.next_batch(0)
    assert [u.owner for u in batch] == [query] and batch[0].priority == INTERACTIVE


def test_classes_are_never_mixed_in_one_batch():
    s = _scheduler(max_batch_size=16)
    _put(s, _units(3, BATCH))
    _put(s, _units(2, INTERACTIVE))
    first, second = s.next_batch(0), s.next_batch(0)
    assert {u.priority for u in first} == {INTERACTIVE} and len(first) == 2
    assert {u.priority for u in second} == {BATCH} and len(second) == 3


def test_the_round_robin_holds_within_the_batch_class():
    s = _scheduler(max_batch_size=2)
    big, small = _owner(), _owner()
    _put(s, _units(10, BATCH, owner=big))
    assert all(u.owner is big for u in s.next_batch(0))
    _put(s, _units(1, BATCH, owner=small))
    assert s.next_batch(0)[0].owner is small  # not after the 8 units big still has queued


def test_waiting_batch_work_goes_first_once_owed_more_than_the_slack():
    """The share rule: each interactive second while batch work waits owes it share/(1-share)
    seconds; past the slack, batch work leads until the debt is paid."""
    s = _scheduler(batch_share=0.2, slack_s=0.5)
    _put(s, _units(4, BATCH))
    _put(s, _units(40, INTERACTIVE))
    assert s.next_batch(0)[0].priority == INTERACTIVE
    s.charge(INTERACTIVE, 1.9)  # owes 0.475 s: within the slack
    assert s.next_batch(0)[0].priority == INTERACTIVE
    s.charge(INTERACTIVE, 0.2)  # owes 0.525 s
    assert s.next_batch(0)[0].priority == BATCH
    s.charge(BATCH, 0.1)  # owes 0.425 s: interactive goes first again
    assert s.next_batch(0)[0].priority == INTERACTIVE


def test_interactive_time_owes_nothing_when_no_batch_work_waits():
    s = _scheduler(batch_share=0.5, slack_s=0.1)
    s.charge(INTERACTIVE, 100.0)
    assert s.owed_s == 0.0
    _put(s, _units(1, BATCH))
    _put(s, _units(1, INTERACTIVE))
    assert s.next_batch(0)[0].priority == INTERACTIVE


def test_a_paused_batch_forward_counts_as_batch_work_waiting():
    s = _scheduler(batch_share=0.5, slack_s=0.1)
    _put(s, _units(2, INTERACTIVE))
    s.charge(INTERACTIVE, 1.0, batch_waiting=True)
    assert s.owed_s == pytest.approx(1.0)
    assert s.preempting_batch() is None  # owed past the slack: the paused forward goes on
    s.charge(BATCH, 0.95)
    assert s.preempting_batch()[0].priority == INTERACTIVE


def test_preempting_takes_only_interactive_work_and_never_waits():
    s = _scheduler()
    _put(s, _units(3, BATCH))
    began = time.monotonic()
    assert s.preempting_batch() is None
    s.expect(1)  # one interactive unit still being prepared: not waited for
    assert s.preempting_batch() is None and time.monotonic() - began < 0.05


def test_under_a_saturating_query_stream_batch_work_gets_its_share():
    """Simulated time: the model thread always has a query ready; batch forwards of 1 s, query
    forwards of 0.1 s. Over 200 s, batch work gets at least its share of the time."""
    share = 0.1
    s = _scheduler(batch_share=share, slack_s=0.5, max_batch_size=1)
    _put(s, _units(1000, BATCH))
    used = {INTERACTIVE: 0.0, BATCH: 0.0}
    while sum(used.values()) < 200:
        _put(s, _units(1, INTERACTIVE))
        batch = s.next_batch(0)
        seconds = 1.0 if batch[0].priority == BATCH else 0.1
        s.charge(batch[0].priority, seconds)
        used[batch[0].priority] += seconds
    assert used[BATCH] / sum(used.values()) >= share - 0.01
    assert used[INTERACTIVE] / sum(used.values()) >= 0.8  # and queries still get most of it


# -- the engine: preemption between layers ---------------------------------------------------------
class Waiter:
    def __init__(self) -> None:
        self.outcome, self.at, self.done = None, None, threading.Event()

    def __call__(self, outcome) -> None:
        self.outcome, self.at = outcome, time.monotonic()
        self.done.set()


def _embed_job(texts: list[str], kind: str, priority: str) -> Job:
    tasks = [Task(kind, i, EmbedWork(InputItem(texts=(t,), where=f"inputs[{i}]"), None), f"inputs[{i}]")
             for i, t in enumerate(texts)]
    return Job(size=len(texts), tasks=tasks, priority=priority)


def _engine(*backends, **batching) -> Engine:
    engine = Engine(Batching(**{"max_batch_size": 8, "prep_workers": 2, "max_wait_ms": 0.0, **batching}),
                    loader(*backends))
    threading.Thread(target=engine.run, daemon=True).start()
    assert engine.wait_loaded(10) and engine.state is EngineState.READY
    return engine


@pytest.fixture
def engines():
    made = []

    def make(*backends, **batching) -> Engine:
        made.append(_engine(*backends, **batching))
        return made[-1]

    yield make
    for engine in made:
        engine.stop()


def _submit(engine: Engine, texts: list[str], priority: str, kind: str = EMBEDDING) -> Waiter:
    waiter = Waiter()
    engine.submit(_embed_job(texts, kind, priority), waiter)
    return waiter


def _wait_forwarding(backend: StandIn, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while len(backend.batches) < count:
        assert time.monotonic() < deadline, "no forward began"
        time.sleep(0.005)


def test_an_interactive_request_is_answered_inside_a_running_batch_forward(engines):
    backend = StandIn(EMBEDDING, layers=20, layer_s=0.05)  # a 1 s forward
    engine = engines(backend)
    bulk = _submit(engine, [f"bulk text {i}" for i in range(8)], BATCH)
    _wait_forwarding(backend)
    query = _submit(engine, ["a query"], INTERACTIVE)
    assert query.done.wait(10) and bulk.done.wait(10)
    assert isinstance(query.outcome, JobResult) and isinstance(bulk.outcome, JobResult)
    assert query.at < bulk.at - 0.3  # answered with most of the bulk forward still to run
    assert engine.status().preemptions == 1
    assert backend.batches[1] == ["a query"]  # its own forward, not added to the paused one


def test_the_paused_forward_resumes_with_its_own_results(engines):
    backend = StandIn(EMBEDDING, layers=10, layer_s=0.02)
    engine = engines(backend)
    texts = ["one", "three", "fifteen letters"]
    bulk = _submit(engine, texts, BATCH)
    _wait_forwarding(backend)
    query = _submit(engine, ["query of any length"], INTERACTIVE)
    assert bulk.done.wait(10) and query.done.wait(10)
    assert [float(v[0]) for v in bulk.outcome.values] == [len(t) for t in texts]
    assert float(query.outcome.values[0][0]) == len("query of any length")


def test_batch_forwards_are_not_paused_with_preemption_off(engines):
    backend = StandIn(EMBEDDING, layers=10, layer_s=0.03)
    engine = engines(backend, preempt=False)
    bulk = _submit(engine, ["bulk"], BATCH)
    _wait_forwarding(backend)
    query = _submit(engine, ["query"], INTERACTIVE)
    assert query.done.wait(10) and bulk.done.wait(10)
    assert query.at >= bulk.at and backend.pauses == 0 and engine.status().preemptions == 0


def test_interactive_forwards_are_never_paused(engines):
    backend = StandIn(EMBEDDING, layers=5, layer_s=0.01)
    engine = engines(backend)
    assert _submit(engine, ["query"], INTERACTIVE).done.wait(10)
    assert backend.pauses == 0


def test_an_interactive_rerank_runs_inside_a_batch_embedding_forward(engines):
    embedder = StandIn(EMBEDDING, layers=20, layer_s=0.05)
    reranker = StandIn(RERANKER, layers=2, layer_s=0.01)
    engine = engines(embedder, reranker)
    bulk = _submit(engine, ["bulk"] * 4, BATCH)
    _wait_forwarding(embedder)
    waiter = Waiter()
    work = RerankWork(InputItem(texts=("q",), where="query"), InputItem(texts=("doc",), where="documents[0]"), None)
    engine.submit(Job(size=1, tasks=[Task(RERANKER, 0, work, "documents[0]")]), waiter)
    assert waiter.done.wait(10) and bulk.done.wait(10)
    assert waiter.at < bulk.at - 0.3 and reranker.pauses == 0
    assert waiter.outcome.values[0] == pytest.approx(1 / (1 + len("q|doc")))


def test_a_failing_interactive_forward_fails_only_its_own_request(engines):
    def forward(batch):
        if any(p.text == "explode" for p in batch):
            raise RuntimeError("boom")
        return [np.full(8, float(len(p.text)), np.float32) for p in batch]

    backend = StandIn(EMBEDDING, layers=10, layer_s=0.03, forward=forward)
    engine = engines(backend)
    bulk = _submit(engine, ["bulk"] * 2, BATCH)
    _wait_forwarding(backend)
    query = _submit(engine, ["explode"], INTERACTIVE)
    assert query.done.wait(10) and bulk.done.wait(10)
    assert isinstance(query.outcome, RequestError) and query.outcome.code is ErrorCode.INTERNAL
    assert isinstance(bulk.outcome, JobResult)


def test_a_steady_query_stream_cannot_starve_a_batch_forward(engines):
    """Queries back to back, each a 0.1 s forward: the paused batch forward still progresses at
    its share (0.3 of the time here), and ends."""
    backend = StandIn(EMBEDDING, layers=10, layer_s=0.05)  # 0.5 s of its own
    engine = engines(backend, batch_share=0.3)
    bulk = _submit(engine, ["bulk"], BATCH)
    _wait_forwarding(backend)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            _submit(engine, ["q"], INTERACTIVE).done.wait(10)

    floods = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
    for thread in floods:
        thread.start()
    backend.layer_s = 0.05
    try:
        # Its 0.5 s at a share of 0.3 or more, plus the slack: well within 6 s.
        assert bulk.done.wait(6), "the batch forward starved"
    finally:
        stop.set()
    assert isinstance(bulk.outcome, JobResult)


def test_queued_work_is_counted_by_priority(engines):
    gate = threading.Event()
    backend = StandIn(EMBEDDING, forward=lambda b: (gate.wait(5), [np.ones(8, np.float32)] * len(b))[1])
    engine = engines(backend, preempt=False)
    bulk = _submit(engine, ["a", "b", "c"], BATCH)
    query = _submit(engine, ["q"], INTERACTIVE)
    queues = engine.status().queues
    assert queues[BATCH]["inputs"] == 3 and queues[INTERACTIVE]["inputs"] == 1
    assert queues[BATCH]["tokens"] == 0 and queues[INTERACTIVE]["tokens"] == 0  # this test's jobs estimate none
    gate.set()
    assert bulk.done.wait(5) and query.done.wait(5)
    assert engine.status().queues == {INTERACTIVE: {"inputs": 0, "tokens": 0}, BATCH: {"inputs": 0, "tokens": 0}}


# -- the wire field --------------------------------------------------------------------------------
@pytest.mark.parametrize("op, payload", [
    ("embed", {"inputs": ["x"]}),
    ("rerank", {"query": "q", "documents": ["d"]}),
])
def test_priority_defaults_to_interactive_and_takes_batch(op, payload):
    limits, media = Limits(), MediaPolicy()
    assert parse_request({"op": op, **payload}, limits, media).priority == INTERACTIVE
    assert parse_request({"op": op, **payload, "priority": None}, limits, media).priority == INTERACTIVE
    assert parse_request({"op": op, **payload, "priority": "batch"}, limits, media).priority == BATCH


@pytest.mark.parametrize("value", ["BATCH", "bulk", "", 1, True, ["batch"], {"batch": 1}, 0.5, b"batch"])
@pytest.mark.parametrize("op, payload", [
    ("embed", {"inputs": ["x"]}),
    ("rerank", {"query": "q", "documents": ["d"]}),
])
def test_a_bad_priority_is_invalid_naming_the_field(op, payload, value):
    with pytest.raises(RequestError) as err:
        parse_request({"op": op, **payload, "priority": value}, Limits(), MediaPolicy())
    assert err.value.code is ErrorCode.INVALID_REQUEST and err.value.message.startswith("priority:")


# -- through the socket, the clients, the CLI and the bridge ---------------------------------------
def test_both_priorities_give_the_same_vectors_and_scores_through_the_socket(client):
    texts = ["a stored memory", "another one, longer than the first"]
    interactive, batch = client.embed(texts), client.embed(texts, priority=BATCH)
    assert np.array_equal(interactive.embeddings, batch.embeddings)
    scores = [client.rerank("q", texts, priority=p).scores for p in (INTERACTIVE, BATCH)]
    assert scores[0] == scores[1]


def test_health_and_metrics_count_queued_work_and_forwards_by_priority(client):
    client.embed(["counted as batch work"], priority=BATCH)
    health = client.health()
    assert set(health["queues"]) == {INTERACTIVE, BATCH}
    assert set(health["queues"][BATCH]) == {"inputs", "tokens"}
    metrics = client.request({"op": "metrics"})
    assert set(metrics["priorities"]) == {INTERACTIVE, BATCH} and "preemptions" in metrics
    assert metrics["priorities"][BATCH]["batches"] >= 1
    assert {"queued_inputs", "queued_tokens", "forward_s"} <= set(metrics["priorities"][BATCH])


def test_the_clients_refuse_an_unknown_priority_before_sending(client):
    with pytest.raises(ValueError, match="priority"):
        client.embed(["x"], priority="urgent")


def test_the_async_client_sends_the_priority(daemon):
    import asyncio

    from daemon.client import AsyncClient

    async def run():
        async with AsyncClient(daemon.endpoint, timeout=30) as c:
            return (await c.embed(["async"], priority=BATCH)).embeddings, (await c.embed(["async"])).embeddings

    batch, interactive = asyncio.run(run())
    assert np.array_equal(batch, interactive)


def test_the_cli_takes_a_priority(daemon):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "daemon", "embed", "--endpoint", daemon.endpoint, "--priority", "batch",
                          "cli text"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["embeddings"]) == 1
    bad = subprocess.run([sys.executable, "-m", "daemon", "embed", "--endpoint", daemon.endpoint, "--priority", "soon",
                          "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--priority" in bad.stderr


@pytest.mark.parametrize("path, body", [
    ("/embed", {"texts": ["bridge text"]}),
    ("/rerank", {"query": "q", "documents": ["d"]}),
    ("/v1/embeddings", {"input": ["bridge text"]}),
    ("/v1/rerank", {"query": "q", "documents": ["d"]}),
])
def test_the_bridge_takes_the_priority_as_a_field_and_as_a_header(bridge, daemon, path, body):
    with daemon.client() as c:
        before = c.request({"op": "metrics"})["priorities"][BATCH]["batched_inputs"]
    with bridge.http() as http:
        assert http.post(path, json={**body, "priority": "batch"}).status_code == 200
        assert http.post(path, json=body, headers={"X-Priority": "batch"}).status_code == 200
        assert http.post(path, json=body, headers={"X-Priority": "Batch"}).status_code == 200
        bad_header = http.post(path, json=body, headers={"X-Priority": "urgent"})
        bad_field = http.post(path, json={**body, "priority": "urgent"})
    with daemon.client() as c:
        after = c.request({"op": "metrics"})["priorities"][BATCH]["batched_inputs"]
    assert after - before == 3  # one input each
    # The bridge's status for an invalid request (422, as for any body it refuses), naming what was wrong.
    assert bad_header.status_code == 422 and "X-Priority" in bad_header.json()["error"]["message"]
    assert bad_field.status_code == 422 and "priority" in bad_field.text


def test_the_prometheus_export_has_the_per_priority_families(bridge):
    with bridge.http() as http:
        text = http.get("/metrics").text
    for family in ("qwen3vl_daemon_priority_queue_depth", "qwen3vl_daemon_priority_forward_seconds_total",
                   "qwen3vl_daemon_preemptions_total"):
        assert family in text
    assert 'qwen3vl_daemon_priority_queue_depth{priority="batch"}' in text
