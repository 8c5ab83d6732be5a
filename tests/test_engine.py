"""The engine and the handlers on stand-in backends (no model, no socket): milliseconds per test."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest

from daemon.engine.backends import EMBEDDING, RERANKER, EmbedWork
from daemon.config import Batching, DaemonConfig, MediaPolicy
from qwen3vl_client.limits import Limits
from daemon.engine.engine import Engine, EngineState, Job, JobResult, Task
from qwen3vl_client.errors import ErrorCode, RequestError
from daemon.handlers import HANDLERS, Context, build_handlers
from qwen3vl_client.inputs import InputItem
from daemon.engine.metrics import Metrics
from qwen3vl_client.protocol import EmbedReply, OPS, RerankReply, parse_request
from standins import StandIn, loader


class Outcomes:
    """A completion that records every call."""

    def __init__(self) -> None:
        self.calls: list = []
        self._cond = threading.Condition()

    def __call__(self, outcome) -> None:
        with self._cond:
            self.calls.append(outcome)
            self._cond.notify_all()

    def wait(self, count: int = 1, timeout: float = 10.0) -> list:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= count, timeout), self.calls
            return list(self.calls)


@pytest.fixture
def running():
    """Start engines on a background thread; stop them after the test."""
    engines = []

    def start(*backends, batching: Batching | None = None, wait: bool = True, gate=None) -> Engine:
        engine = Engine(batching or Batching(max_batch_size=8, prep_workers=2, max_wait_ms=0.0),
                        loader(*backends, gate=gate))
        threading.Thread(target=engine.run, daemon=True).start()
        if wait:
            assert engine.wait_loaded(10) and engine.state is EngineState.READY
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


def text_job(*texts: str, kind: str = EMBEDDING, **fields) -> Job:
    tasks = [Task(kind, i, EmbedWork(InputItem(f"inputs[{i}]", texts=(t,)), None), f"inputs[{i}]")
             for i, t in enumerate(texts)]
    return Job(size=len(tasks), tasks=tasks, **fields)


def test_a_job_completes_once_with_every_result_in_its_slot(running):
    engine = running(StandIn(EMBEDDING))
    done = Outcomes()
    engine.submit(text_job("a", "bbb", "cc"), done)
    (result,) = done.wait()
    time.sleep(0.05)
    assert len(done.calls) == 1
    assert isinstance(result, JobResult)
    assert [float(v[0]) for v in result.values] == [1.0, 3.0, 2.0]
    assert result.tokens == 6
    assert engine.status().queue_depth == 0


def test_an_answered_job_is_freed_at_once_without_the_cycle_collector(running):
    engine = running(StandIn(EMBEDDING))
    gc.disable()  # only reference counting may free it
    try:
        job, done = text_job("a", "b"), Outcomes()
        freed = weakref.ref(job)
        engine.submit(job, done)
        del job
        done.wait()
        deadline = time.monotonic() + 2.0  # the model thread drops its last batch within 0.2 s
        while freed() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert freed() is None
    finally:
        gc.enable()


def test_results_known_at_submission_complete_without_a_forward(running):
    backend = StandIn(EMBEDDING)
    engine = running(backend)
    done = Outcomes()
    engine.submit(Job(size=2, tasks=[], known={0: "x", 1: "y"}), done)
    assert done.wait()[0].values == ["x", "y"]
    assert backend.batches == []


def test_a_bad_input_fails_only_its_own_job(running):
    engine = running(StandIn(EMBEDDING))
    bad, good = Outcomes(), Outcomes()
    engine.submit(text_job("fine", "a bad input"), bad)
    engine.submit(text_job("also fine"), good)
    error = bad.wait()[0]
    assert isinstance(error, RequestError) and error.code is ErrorCode.INPUT_ERROR
    assert isinstance(good.wait()[0], JobResult)


def test_a_failing_forward_fails_its_batch_only_and_the_engine_goes_on(running):
    def forward(batch):
        if any("boom" in p.text for p in batch):
            raise RuntimeError("kernel exploded")
        return [np.zeros(8, np.float32) for _ in batch]

    engine = running(StandIn(EMBEDDING, forward=forward))
    first, second = Outcomes(), Outcomes()
    engine.submit(text_job("boom"), first)
    error = first.wait()[0]
    assert error.code is ErrorCode.INTERNAL and "kernel exploded" in error.message
    engine.submit(text_job("calm"), second)
    assert isinstance(second.wait()[0], JobResult)


def test_out_of_memory_retries_the_batch_in_halves(running):
    sizes = []

    def forward(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise MemoryError("device full")
        return np.stack([np.full(8, p.tokens, np.float32) for p in batch])  # one array, as the models return

    engine = running(StandIn(EMBEDDING, forward=forward), batching=Batching(max_batch_size=8, prep_workers=1))
    done = Outcomes()
    texts = ["t" * (i + 1) for i in range(8)]
    engine.submit(text_job(*texts), done)
    result = done.wait()[0]
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # tried whole, then in halves down to what fits
    assert [float(v[0]) for v in result.values] == [len(t) for t in texts]  # each slot its own result


def test_a_backend_returning_too_few_results_fails_its_batch_instead_of_leaving_it_waiting(running):
    engine = running(StandIn(EMBEDDING, forward=lambda batch: [np.zeros(8, np.float32)] * (len(batch) - 1)))
    done = Outcomes()
    engine.submit(text_job("a", "b"), done)
    error = done.wait()[0]
    assert error.code is ErrorCode.INTERNAL and "results for" in error.message


def test_a_non_finite_output_is_an_internal_error_naming_the_input(running):
    engine = running(StandIn(EMBEDDING, forward=lambda batch: [np.full(8, np.nan, np.float32) for _ in batch]))
    done = Outcomes()
    engine.submit(text_job("x", "y"), done)
    error = done.wait()[0]
    assert error.code is ErrorCode.INTERNAL and error.message.startswith("inputs[")
    assert "non-finite" in error.message


def test_an_expired_job_is_answered_at_once_and_its_work_never_runs(running):
    release = threading.Event()
    backend = StandIn(EMBEDDING, forward=lambda batch: (release.wait(5), [np.ones(8, np.float32)] * len(batch))[1])
    engine = running(backend, batching=Batching(max_batch_size=1, prep_workers=1))
    blocker, late = Outcomes(), Outcomes()
    engine.submit(text_job("holds the model thread"), blocker)
    time.sleep(0.1)
    engine.submit(text_job("too late", deadline_ms=50), late)
    time.sleep(0.1)
    engine.expire()
    error = late.wait()[0]
    release.set()
    blocker.wait()
    time.sleep(0.1)
    assert error.code is ErrorCode.DEADLINE_EXCEEDED and "deadline_ms=50" in error.message
    assert ["too late"] not in backend.batches


def test_abort_all_answers_every_live_job_exactly_once(running):
    release = threading.Event()
    engine = running(StandIn(EMBEDDING, forward=lambda b: (release.wait(5), [np.ones(8, np.float32)] * len(b))[1]),
                     batching=Batching(max_batch_size=1, prep_workers=1))
    outcomes = [Outcomes() for _ in range(5)]
    for i, done in enumerate(outcomes):
        engine.submit(text_job(f"job {i}"), done)
    time.sleep(0.1)
    aborted = engine.abort_all(RequestError(ErrorCode.SHUTTING_DOWN, "stopping"))
    release.set()
    time.sleep(0.3)
    assert aborted == 5
    assert all(len(done.calls) == 1 and done.calls[0].code is ErrorCode.SHUTTING_DOWN for done in outcomes)
    assert engine.status().queue_depth == 0


def test_admission_refuses_with_the_code_that_says_why(running):
    gate = threading.Event()
    engine = running(StandIn(EMBEDDING), wait=False, gate=gate,
                     batching=Batching(max_queued_inputs=4, max_queued_tokens=1000))
    with pytest.raises(RequestError) as loading:
        engine.submit(text_job("x"), Outcomes())
    gate.set()
    assert engine.wait_loaded(10)
    with pytest.raises(RequestError) as disabled:
        engine.submit(text_job("x", kind=RERANKER), Outcomes())
    with pytest.raises(RequestError) as too_many:
        engine.submit(text_job(*"abcde"), Outcomes())
    with pytest.raises(RequestError) as too_long:
        engine.submit(text_job("x", est_tokens=1001), Outcomes())
    engine.drain()
    with pytest.raises(RequestError) as draining:
        engine.submit(text_job("x"), Outcomes())
    assert (loading.value.code, disabled.value.code) == (ErrorCode.NOT_LOADED, ErrorCode.NOT_LOADED)
    assert "models are loading" in loading.value.message and "reranker model is disabled" in disabled.value.message
    assert "max_queued_inputs" in too_many.value.message and too_many.value.code is ErrorCode.TOO_LARGE
    assert "max_queued_tokens" in too_long.value.message and too_long.value.code is ErrorCode.TOO_LARGE
    assert draining.value.code is ErrorCode.SHUTTING_DOWN


def test_a_full_queue_is_overloaded_until_work_is_answered(running):
    release = threading.Event()
    engine = running(StandIn(EMBEDDING, forward=lambda b: (release.wait(5), [np.ones(8, np.float32)] * len(b))[1]),
                     batching=Batching(max_queued_inputs=3, prep_workers=1))
    first = Outcomes()
    engine.submit(text_job("a", "b"), first)
    with pytest.raises(RequestError) as full:
        engine.submit(text_job("c", "d"), Outcomes())
    release.set()
    first.wait()
    time.sleep(0.05)
    again = Outcomes()
    engine.submit(text_job("c", "d"), again)
    assert full.value.code is ErrorCode.OVERLOADED
    assert isinstance(again.wait()[0], JobResult)


def test_jobs_from_many_threads_each_complete_exactly_once_with_their_own_results(running):
    engine = running(StandIn(EMBEDDING), batching=Batching(max_batch_size=16, prep_workers=2, max_wait_ms=0.5))
    outcomes = {}

    def client(k: int) -> None:
        for i in range(20):
            done = outcomes[(k, i)] = Outcomes()
            engine.submit(text_job("x" * (k + 1), "y" * (i + 1)), done)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (k, i), done in outcomes.items():
        (result,) = done.wait()
        assert [float(v[0]) for v in result.values] == [k + 1, i + 1]
    time.sleep(0.05)
    assert all(len(done.calls) == 1 for done in outcomes.values())


def test_the_engine_names_no_op_no_request_type_and_no_transport():
    import ast
    import inspect

    import daemon.engine.engine as engine_module

    tree = ast.parse(inspect.getsource(engine_module))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {(n.module or "") + "." + a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    words = {part for name in names for part in name.replace(".", "_").lower().split("_")}
    for forbidden in ("embed", "rerank", "embedding", "reranker", "request", "envelope", "protocol", "msgpack", "zmq"):
        assert forbidden not in words


# -- handlers -----------------------------------------------------------------------------------------
def test_every_op_of_the_protocol_has_exactly_one_handler():
    assert set(HANDLERS) == set(OPS)
    assert all(cls.op == op for op, cls in HANDLERS.items())


def _handlers(engine: Engine, config: DaemonConfig | None = None):
    return build_handlers(Context(config or DaemonConfig(embedding_dim=None), engine, Metrics()))


def _request(payload: dict):
    return parse_request(payload, Limits(), MediaPolicy())


def _run(handler, request) -> object:
    done = Outcomes()
    job = handler.start(request)
    handler.ctx.engine.submit(job, done)
    result = done.wait()[0]
    assert isinstance(result, JobResult), result
    return handler.finish(request, job, result)


def test_the_embed_handler_cuts_and_normalises_its_results(running):
    engine = running(StandIn(EMBEDDING, dim=8))
    handlers = _handlers(engine)
    request = _request({"op": "embed", "id": 7, "inputs": ["abc", "de"], "dimension": 4})
    reply = _run(handlers["embed"], request)
    assert isinstance(reply, EmbedReply) and reply.dimension == 4 and reply.count == 2
    np.testing.assert_allclose(reply.embeddings, np.full((2, 4), 0.5, np.float32))
    assert reply.model == "stand-in-embedding" and reply.tokens == 5


def test_the_embed_handler_refuses_a_dimension_over_the_model_size(running):
    handlers = _handlers(running(StandIn(EMBEDDING, dim=8)))
    with pytest.raises(RequestError) as refused:
        handlers["embed"].start(_request({"op": "embed", "inputs": ["x"], "dimension": 9}))
    assert refused.value.code is ErrorCode.INVALID_REQUEST and refused.value.message.startswith("dimension:")


def test_the_rerank_handler_keeps_document_order(running):
    handlers = _handlers(running(StandIn(RERANKER)))
    request = _request({"op": "rerank", "query": "q", "documents": ["long document", "d", "mid"]})
    reply = _run(handlers["rerank"], request)
    assert isinstance(reply, RerankReply)
    assert reply.scores == [1 / (1 + len("q|" + d)) for d in ("long document", "d", "mid")]


def test_health_and_metrics_are_answered_without_the_model_thread(running):
    release = threading.Event()
    engine = running(StandIn(EMBEDDING, forward=lambda b: (release.wait(5), [np.ones(8, np.float32)] * len(b))[1]))
    handlers = _handlers(engine)
    engine.submit(text_job("busy"), Outcomes())
    time.sleep(0.05)
    health = handlers["health"].start(_request({"op": "health"})).to_wire()
    metrics = handlers["metrics"].start(_request({"op": "metrics"})).to_wire()
    release.set()
    assert health["status"] == "ready" and health["queue_depth"] == 1 and health["protocol"] == 1
    assert health["embedding"] == {"name": "stand-in-embedding", "enabled": True, "loaded": True,
                                   "dimension": 8, "max_dimension": 8, "fingerprint": None,
                                   "quantization": "fixed", "calibrated_dimensions": None, "weights": "float32",
                                   "memory_bytes": 0, "memory_estimate_bytes": None}
    assert health["reranker"]["loaded"] is False and health["device"] == "cpu"
    assert metrics["queue_depth"] == 1 and set(metrics) >= {"requests", "errors", "latency_s", "batch_size"}


def test_health_while_loading_names_the_step_and_splits_the_time_so_far(running):
    gate = threading.Event()
    engine = running(StandIn(EMBEDDING), wait=False, gate=gate)
    handlers = _handlers(engine)
    time.sleep(0.2)
    loading = handlers["health"].start(_request({"op": "health"})).to_wire()
    gate.set()
    assert engine.wait_loaded(10)
    ready = handlers["health"].start(_request({"op": "health"})).to_wire()
    assert loading["status"] == "loading" and loading["load"]["step"] == "loading stand-in-embedding"
    assert loading["load"]["weights_s"] >= 0.15 and loading["load"]["total_s"] >= loading["load"]["weights_s"]
    assert ready["status"] == "ready" and ready["load"]["step"] is None
    assert ready["load"]["weights_s"] >= loading["load"]["weights_s"]
    assert ready["load"]["total_s"] >= ready["load"]["import_s"] + ready["load"]["weights_s"] + ready["load"]["warmup_s"]


def test_a_loader_that_raises_anything_fails_the_start_instead_of_hanging_it():
    def broken(backends, step):
        step("reading something odd", "weights")
        raise TypeError("'int' object is not iterable")

    engine = Engine(Batching(prep_workers=1), broken)
    threading.Thread(target=engine.run, daemon=True).start()
    assert engine.wait_loaded(10) and engine.state is EngineState.FAILED
    assert engine.load_error == "loading failed while reading something odd: TypeError: 'int' object is not iterable"
    engine.stop()
