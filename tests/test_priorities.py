"""Priorities and preemption: the scheduler's classes and share rule on their own, then the engine
pausing a batch-priority forward between its layers for interactive work (stand-in backends whose
forwards are "layers" of sleeps), in milliseconds to a few seconds per test."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from daemon.engine.backends import EMBEDDING, RERANKER, EmbedWork, RerankWork
from daemon.engine.batching import BatchPolicy, Scheduler, Unit
from daemon.config import Batching, MediaPolicy
from qwen3vl_client.limits import Limits
from qwen3vl_client.protocol import BATCH, INTERACTIVE
from daemon.engine.engine import Engine, EngineState, Job, JobResult, Task
from qwen3vl_client.errors import ErrorCode, RequestError
from qwen3vl_client.inputs import InputItem
from qwen3vl_client.protocol import parse_request
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
    s = _scheduler(max_wait_s=5.0)  # a batch would linger up to 5 s for units still being prepared
    _put(s, _units(3, BATCH))
    began = time.monotonic()
    assert s.preempting_batch() is None
    s.expect(1)  # one interactive unit still being prepared: not waited for
    assert s.preempting_batch() is None and time.monotonic() - began < 2.0


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
    assert query.at < bulk.at  # answered while the bulk forward was paused, not after it
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
    assert waiter.at < bulk.at and reranker.pauses == 0
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


def _rerank_job(text: str) -> Job:
    work = RerankWork(InputItem(texts=("q",), where="query"), InputItem(texts=(text,), where="documents[0]"), None)
    return Job(size=1, tasks=[Task(RERANKER, 0, work, "documents[0]")])


def test_a_steady_query_stream_cannot_starve_a_batch_forward(engines):
    """Queries back to back from two clients, each a 0.1 s forward of the other model: the paused
    0.5 s batch forward still progresses at its share (0.3 here) and ends within its own time
    over the share, plus the slack."""
    backend = StandIn(EMBEDDING, layers=10, layer_s=0.05)
    queries = StandIn(RERANKER, layers=1, layer_s=0.1)
    engine = engines(backend, queries, batch_share=0.3)
    bulk = _submit(engine, ["bulk"], BATCH)
    _wait_forwarding(backend)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            waiter = Waiter()
            engine.submit(_rerank_job("doc"), waiter)
            waiter.done.wait(10)

    floods = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
    for thread in floods:
        thread.start()
    try:
        # 0.5 s of its own at a share of 0.3: ~1.7 s, and ~1.2 s of queries the slack lets go first;
        # starved, it would never end.
        assert bulk.done.wait(15), "the batch forward starved"
    finally:
        stop.set()
    assert isinstance(bulk.outcome, JobResult) and len(queries.batches) >= 5  # the queries did run inside it


def test_the_debt_is_forgiven_once_the_batch_work_it_was_owed_to_is_gone():
    s = _scheduler(batch_share=0.5, slack_s=0.1)
    owner = _owner()
    _put(s, _units(2, BATCH, owner=owner))
    s.charge(INTERACTIVE, 1.0)  # owes 1 s: batch would go first
    owner.closed = True  # its request answered (a deadline, a client gone)
    _put(s, _units(1, INTERACTIVE))
    assert s.next_batch(0)[0].priority == INTERACTIVE and s.owed_s == 0.0
    _put(s, _units(1, BATCH))  # a new batch request owes nothing it did not wait for
    _put(s, _units(1, INTERACTIVE))
    assert s.next_batch(0)[0].priority == INTERACTIVE


class CountingOwner:
    """A request whose every look at `closed` (the scheduler checking its units) is counted."""

    def __init__(self) -> None:
        self.turn, self.looks = None, 0

    @property
    def closed(self) -> bool:
        self.looks += 1
        return False


def test_a_pause_costs_nothing_that_grows_with_the_batch_queue():
    """The check before every decoder layer, with no interactive work ready, does not look at the
    queued batch units (8192 of them here), and with some ready, looks at those only."""
    s = _scheduler()
    bulk = CountingOwner()
    _put(s, _units(8192, BATCH, owner=bulk))
    for _ in range(100):
        assert s.preempting_batch() is None
    _put(s, _units(1, INTERACTIVE))
    assert s.preempting_batch()[0].priority == INTERACTIVE
    assert bulk.looks == 0


def test_queued_work_is_counted_by_priority(engines):
    gate = threading.Event()
    backend = StandIn(EMBEDDING, forward=lambda b: (gate.wait(5), [np.ones(8, np.float32)] * len(b))[1])
    engine = engines(backend, preempt=False)
    waiters = []
    for texts, priority, tokens in ((["a", "b", "c"], BATCH, 300), (["q"], INTERACTIVE, 20)):
        waiters.append(Waiter())
        engine.submit(replace(_embed_job(texts, EMBEDDING, priority), est_tokens=tokens), waiters[-1])
    assert engine.status().queues == {INTERACTIVE: {"inputs": 1, "tokens": 20}, BATCH: {"inputs": 3, "tokens": 300}}
    gate.set()
    assert all(w.done.wait(5) for w in waiters)
    assert engine.status().queues == {INTERACTIVE: {"inputs": 0, "tokens": 0}, BATCH: {"inputs": 0, "tokens": 0}}


def test_a_pause_that_finds_every_query_answered_counts_no_preemption(engines):
    backend = StandIn(EMBEDDING, layers=10, layer_s=0.03)
    engine = engines(backend)
    bulk = _submit(engine, ["bulk"], BATCH)
    _wait_forwarding(backend)
    waiter = Waiter()
    ticket = engine.submit(_embed_job(["too late"], EMBEDDING, INTERACTIVE), waiter)
    ticket.fail(RequestError(ErrorCode.DEADLINE_EXCEEDED, "gone"))  # answered before its forward
    assert bulk.done.wait(5) and engine.status().preemptions == 0


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

    from qwen3vl_client.client import AsyncClient

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


class OlderDaemon:
    """A ROUTER that answers as a daemon from before priorities: `priority` is an unknown field;
    without it, an embed reply of one 4-wide vector per input. Records every payload it got."""

    def __init__(self, tmp_path):
        import zmq

        self.endpoint = f"ipc://{tmp_path}/older.sock"
        self.payloads: list[dict] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.bind(self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        from qwen3vl_client.protocol import pack, unpack

        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            *route, payload = self._sock.recv_multipart()
            request = unpack(payload)
            self.payloads.append(request)
            if "priority" in request:
                body = {"ok": False, "error": {"code": "invalid_request",
                                               "message": f"{request['op']}: unknown field(s) priority"}}
            else:
                count = len(request["inputs"])
                body = {"ok": True, "embeddings": np.ones((count, 4), np.float32).tobytes(), "dimension": 4,
                        "count": count, "encoding": "float32", "model": "old", "tokens": count, "fingerprint": None}
            self._sock.send_multipart([*route, pack({"id": request.get("id"), **body})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)
        self._ctx.term()


def test_interactive_requests_leave_the_field_out_and_batch_ones_fall_back_on_an_older_daemon(tmp_path):
    import asyncio

    from qwen3vl_client.client import AsyncClient, Client

    older = OlderDaemon(tmp_path)
    try:
        with Client(older.endpoint, timeout=10) as client:
            assert client.embed(["x"]).count == 1 and client.embed(["x"], priority=INTERACTIVE).count == 1
            assert client.embed(["x", "y"], priority=BATCH).count == 2

        async def run():
            async with AsyncClient(older.endpoint, timeout=10) as c:
                return (await c.embed(["z"], priority=BATCH)).count

        assert asyncio.run(run()) == 1
    finally:
        older.close()
    sent = [p.get("priority") for p in older.payloads]
    # interactive: never sent; batch: sent, refused, sent again without it
    assert sent == [None, None, BATCH, None, BATCH, None]


def test_health_queues_return_to_zero_after_work_of_both_priorities(client):
    texts = [f"queued text {i}" for i in range(6)]
    client.embed(texts, priority=BATCH)
    client.rerank("q", texts)
    queues = client.health()["queues"]
    assert queues == {INTERACTIVE: {"inputs": 0, "tokens": 0}, BATCH: {"inputs": 0, "tokens": 0}}


def test_the_bridge_refuses_a_bad_or_conflicting_header_even_when_the_body_names_a_priority(bridge):
    body = {"texts": ["x"], "priority": "interactive"}
    with bridge.http() as http:
        bad = http.post("/embed", json=body, headers={"X-Priority": "urgent"})
        twice = http.post("/embed", json={"texts": ["x"]}, headers=[("X-Priority", "batch"), ("X-Priority", "interactive")])
        same_twice = http.post("/embed", json={"texts": ["x"]}, headers=[("X-Priority", "batch"), ("X-Priority", "batch")])
        spaced = http.post("/embed", json=body, headers={"X-Priority": "BATCH"})
    assert bad.status_code == 422 and "X-Priority" in bad.json()["error"]["message"]
    assert twice.status_code == 422 and "more than once" in twice.json()["error"]["message"]
    assert same_twice.status_code == 200 and spaced.status_code == 200
