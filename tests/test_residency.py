"""Models on demand, on stand-in backends: loading when asked while other models serve, keep-alive,
the memory budget's least-recently-used swaps, failed loads, and the catalog that names the models.
The same behaviours on real tiny checkpoints and real daemons are in test_on_demand.py."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from conftest import exchange
from daemon.engine.backends import EMBEDDING, RERANKER, EmbedWork
from daemon.loading.catalog import (CatalogError, ModelCard, apply_settings, check_names, parse_duration, resolve,
                            split_spec)
from daemon.config import Batching, DaemonConfig, ModelSettings
from daemon.engine.engine import Engine, EngineState, Job, Task
from daemon.errors import ModelLoadError
from qwen3vl_client.errors import ErrorCode, RequestError
from qwen3vl_client.inputs import InputItem
from daemon.engine.residency import MemoryGate, ModelState, Residency
from daemon.serving.server import Server
from standins import StandIn

MB = 1 << 20


def card(name: str, task: str = EMBEDDING, default: bool = False, fingerprint: str | None = None,
         keep_alive_s: float | None = None, estimate_mb: int = 0) -> ModelCard:
    return ModelCard(name=name, task=task, source=f"/models/{name}", default=default,
                     fingerprint=fingerprint or f"fp-{name}", max_length=512, hidden_size=8 if task == EMBEDDING else None,
                     keep_alive_s=keep_alive_s, estimate_bytes=estimate_mb * MB)


class Builds:
    """Stand-in builds that count, can be held at a gate, and can fail."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.fail: dict[str, Exception] = {}
        self.forwards: dict = {}  # name -> a forward hook for the backends it builds

    def __call__(self, name: str, task: str = EMBEDDING):
        self.started[name] = threading.Event()

        def build(step):
            self.started[name].set()
            if name in self.gates:
                assert self.gates[name].wait(30)
            if name in self.fail:
                raise self.fail[name]
            self.count[name] = self.count.get(name, 0) + 1
            backend = StandIn(task, dim=8, forward=self.forwards.get(name))
            backend.info = replace(backend.info, name=f"/models/{name}")
            return backend
        return build


def job(key: str, text: str = "x", deadline_ms: float | None = None) -> Job:
    item = InputItem("inputs[0]", texts=(text,))
    return Job(size=1, tasks=[Task(key, 0, EmbedWork(item, None), "inputs[0]")], deadline_ms=deadline_ms)


class Done:
    def __init__(self) -> None:
        self.outcome = None
        self.event = threading.Event()

    def __call__(self, outcome) -> None:
        self.outcome = outcome
        self.event.set()

    def wait(self, timeout: float = 10.0):
        assert self.event.wait(timeout), "no answer"
        return self.outcome


@pytest.fixture
def engines():
    made = []

    def start(residency: Residency, cards_and_builds, batching: Batching | None = None) -> Engine:
        def load(backends, step):
            for c, build in cards_and_builds:
                residency.register(c, build)
        engine = Engine(batching or Batching(max_batch_size=8, prep_workers=2, max_wait_ms=0.0), load,
                        models=residency)
        threading.Thread(target=engine.run, daemon=True).start()
        assert engine.wait_loaded(10) and engine.state is EngineState.READY
        made.append(engine)
        return engine

    yield start
    for engine in made:
        engine.stop()


def test_a_model_is_loaded_when_first_asked_for_and_then_serves_from_memory(engines):
    builds, residency = Builds(), Residency()
    engine = engines(residency, [(card("a", default=True), builds("a"))])
    assert residency.state("embedding:a") is ModelState.UNLOADED
    first, second = Done(), Done()
    engine.submit(job("embedding:a"), first)
    assert not isinstance(first.wait(), RequestError)
    engine.submit(job("embedding:a"), second)
    assert not isinstance(second.wait(), RequestError)
    assert builds.count == {"a": 1} and residency.state("embedding:a") is ModelState.LOADED


def test_requests_for_a_loaded_model_are_answered_while_another_loads(engines):
    builds, residency = Builds(), Residency()
    builds.gates["slow"] = threading.Event()
    engine = engines(residency, [(card("fast", default=True), builds("fast")), (card("slow"), builds("slow"))])
    warm = Done()
    engine.submit(job("embedding:fast"), warm)
    warm.wait()
    waiting = Done()
    engine.submit(job("embedding:slow"), waiting)
    assert builds.started["slow"].wait(5)
    answered = []
    for i in range(5):
        done = Done()
        engine.submit(job("embedding:fast", f"text {i}"), done)
        answered.append(done.wait(5))
    assert residency.state("embedding:slow") is ModelState.LOADING and not waiting.event.is_set()
    assert all(not isinstance(a, RequestError) for a in answered)
    builds.gates["slow"].set()
    assert not isinstance(waiting.wait(), RequestError)


def test_a_request_waiting_for_a_load_is_answered_within_its_deadline(engines):
    builds, residency = Builds(), Residency()
    builds.gates["slow"] = threading.Event()
    engine = engines(residency, [(card("slow", default=True), builds("slow"))])
    done = Done()
    began = time.monotonic()
    engine.submit(job("embedding:slow", deadline_ms=200), done)
    while not done.event.is_set() and time.monotonic() - began < 5:
        engine.expire()
        time.sleep(0.01)
    outcome = done.wait(1)
    assert isinstance(outcome, RequestError) and outcome.code is ErrorCode.DEADLINE_EXCEEDED
    builds.gates["slow"].set()
    later = Done()
    engine.submit(job("embedding:slow"), later)
    assert not isinstance(later.wait(), RequestError)  # the load went on; the next request is served


def test_a_failing_load_answers_every_waiter_with_the_reason_and_the_others_keep_serving(engines):
    builds, residency = Builds(), Residency()
    builds.gates["broken"] = threading.Event()
    builds.fail["broken"] = ModelLoadError("/models/broken/model.safetensors is truncated")
    engine = engines(residency, [(card("ok", default=True), builds("ok")), (card("broken"), builds("broken"))])
    waiters = [Done() for _ in range(3)]
    for done in waiters:
        engine.submit(job("embedding:broken"), done)
    builds.gates["broken"].set()
    for done in waiters:
        outcome = done.wait()
        assert isinstance(outcome, RequestError) and outcome.code is ErrorCode.NOT_LOADED
        assert "could not be loaded: /models/broken/model.safetensors is truncated" in outcome.message
    assert residency.state("embedding:broken") is ModelState.FAILED
    fine = Done()
    engine.submit(job("embedding:ok"), fine)
    assert not isinstance(fine.wait(), RequestError)
    del builds.fail["broken"]  # the fault is fixed: the next request loads it again
    retried = Done()
    engine.submit(job("embedding:broken"), retried)
    assert not isinstance(retried.wait(), RequestError)


def test_a_model_idle_past_its_keep_alive_is_unloaded_and_loads_again_when_asked(engines):
    builds, residency = Builds(), Residency()
    engine = engines(residency, [(card("a", default=True, keep_alive_s=0.3), builds("a")),
                                 (card("b"), builds("b"))])
    for key in ("embedding:a", "embedding:b"):
        done = Done()
        engine.submit(job(key), done)
        done.wait()
    deadline = time.monotonic() + 5
    while residency.state("embedding:a") is not ModelState.UNLOADED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert residency.state("embedding:a") is ModelState.UNLOADED
    assert residency.state("embedding:b") is ModelState.LOADED  # forever: its keep-alive is unset
    again = Done()
    engine.submit(job("embedding:a"), again)
    assert not isinstance(again.wait(), RequestError)
    assert builds.count["a"] == 2


def test_a_model_in_use_is_never_unloaded(engines):
    builds, residency = Builds(), Residency()
    release, forwarding = threading.Event(), threading.Event()
    builds.forwards["a"] = lambda batch: (forwarding.set(), release.wait(10), [np.ones(8, np.float32)] * len(batch))[2]
    engine = engines(residency, [(card("a", default=True, keep_alive_s=0.0), builds("a"))])
    busy = Done()
    engine.submit(job("embedding:a", "busy"), busy)
    assert forwarding.wait(10)
    time.sleep(0.3)  # the loader's chance to unload it, were it idle
    assert residency.state("embedding:a") is ModelState.LOADED  # a keep-alive of 0, but in use
    release.set()
    assert not isinstance(busy.wait(), RequestError)
    deadline = time.monotonic() + 5
    while residency.state("embedding:a") is not ModelState.UNLOADED and time.monotonic() < deadline:
        time.sleep(0.02)
    assert residency.state("embedding:a") is ModelState.UNLOADED  # idle: unloaded at once


def gate_of(budget_mb: int, free_mb: int = 1 << 20) -> MemoryGate:
    return MemoryGate(budget_mb * MB, lambda: (free_mb * MB, f"{free_mb} MB free"))


def test_a_budget_for_two_models_unloads_the_least_recently_used_idle_one_first(engines):
    builds, residency = Builds(), Residency(gate=gate_of(25))
    engine = engines(residency, [(card(n, default=n == "a", estimate_mb=10), builds(n)) for n in "abc"])

    def use(name: str) -> None:
        done = Done()
        engine.submit(job(f"embedding:{name}"), done)
        assert not isinstance(done.wait(), RequestError), done.outcome

    use("a")
    use("b")
    use("a")  # b is now the least recently used
    use("c")
    states = {n: residency.state(f"embedding:{n}") for n in "abc"}
    assert states == {"a": ModelState.LOADED, "b": ModelState.UNLOADED, "c": ModelState.LOADED}
    use("b")  # a was used before c: a goes
    states = {n: residency.state(f"embedding:{n}") for n in "abc"}
    assert states == {"a": ModelState.UNLOADED, "b": ModelState.LOADED, "c": ModelState.LOADED}


def test_a_load_that_cannot_fit_beside_models_in_use_is_refused_naming_the_budget(engines):
    builds, residency = Builds(), Residency(gate=gate_of(15), room_wait_s=0.3)
    release = threading.Event()
    engine = engines(residency, [(card("a", default=True, estimate_mb=10), builds("a")),
                                 (card("b", estimate_mb=10), builds("b"))])
    builds.forwards["a"] = lambda batch: (release.wait(10), [np.ones(8, np.float32)] * len(batch))[1]
    busy, refused = Done(), Done()
    engine.submit(job("embedding:a", "busy"), busy)
    time.sleep(0.3)
    engine.submit(job("embedding:b"), refused)
    outcome = refused.wait()
    release.set()
    assert isinstance(outcome, RequestError) and outcome.code is ErrorCode.OVERLOADED
    assert "--memory-budget 15.7 MB" in outcome.message and "'a' in use for 0.3 s: retry later" in outcome.message
    assert residency.state("embedding:b") is ModelState.UNLOADED and builds.count.get("b") is None
    assert not isinstance(busy.wait(), RequestError)


def test_a_model_larger_than_the_free_memory_is_refused_before_it_loads(engines):
    builds, residency = Builds(), Residency(gate=MemoryGate(None, lambda: (5 * MB, "5.2 MB free on the device")))
    engine = engines(residency, [(card("big", default=True, estimate_mb=10), builds("big"))])
    done = Done()
    engine.submit(job("embedding:big"), done)
    outcome = done.wait()
    assert isinstance(outcome, RequestError) and outcome.code is ErrorCode.OVERLOADED
    assert "needs about 10.5 MB and 5.2 MB free on the device" in outcome.message
    assert builds.count == {}


# -- naming and routing ----------------------------------------------------------------------------
def test_a_model_spec_may_name_the_model():
    assert split_spec("big=/models/Qwen3-VL-Embedding-8B") == ("big", "/models/Qwen3-VL-Embedding-8B")
    assert split_spec("Qwen/Qwen3-VL-Embedding-2B") == (None, "Qwen/Qwen3-VL-Embedding-2B")
    assert split_spec("/data/a=b/model") == (None, "/data/a=b/model")  # an '=' inside a path is the path's
    with pytest.raises(CatalogError, match="must be"):
        split_spec("bad name=/models/x")
    with pytest.raises(CatalogError, match="after '='"):
        split_spec("big=")


def test_a_default_name_is_the_last_part_of_the_source():
    assert ModelSettings("Qwen/Qwen3-VL-Embedding-2B").served_name == "Qwen3-VL-Embedding-2B"
    assert ModelSettings("/models/e8b/").served_name == "e8b"
    assert ModelSettings("/models/e8b", alias="big").served_name == "big"


def test_durations():
    assert parse_duration("30s") == 30 and parse_duration("10m") == 600 and parse_duration("2h") == 7200
    assert parse_duration("0") == 0 and parse_duration("1.5") == 1.5 and parse_duration("500ms") == 0.5
    assert parse_duration("forever") is None
    for bad in ("soon", "-3s", "10 minutes", ""):
        with pytest.raises(CatalogError, match="not a duration"):
            parse_duration(bad)


def test_per_model_settings_apply_to_the_model_named():
    models = [ModelSettings("/m/small"), ModelSettings("/m/big", alias="big")]
    small, big = apply_settings(models, ["big.quantize=int8", "big.keep-alive=10m", "small.max-length=2048"])
    assert big.quantize == "int8" and big.keep_alive_s == 600 and small.max_length == 2048
    assert small.quantize == "none" and small.keep_alive_s is None
    with pytest.raises(CatalogError, match="no model is named 'huge'"):
        apply_settings(models, ["huge.dtype=float32"])
    with pytest.raises(CatalogError, match="unknown setting 'colour'"):
        apply_settings(models, ["big.colour=red"])
    with pytest.raises(CatalogError, match="NAME.KEY=VALUE"):
        apply_settings(models, ["big=int8"])


def test_two_models_of_one_kind_may_not_share_a_name():
    check_names([(EMBEDDING, ModelSettings("/a/model")), (RERANKER, ModelSettings("/b/model"))])  # two kinds: fine
    with pytest.raises(CatalogError, match="two embedding models are named 'model'"):
        check_names([(EMBEDDING, ModelSettings("/a/model")), (EMBEDDING, ModelSettings("/b/model"))])


def test_routing_by_name_source_fingerprint_and_default():
    cards = [card("small", default=True), card("big"), card("rr", task=RERANKER, default=True)]
    assert resolve(cards, EMBEDDING, None, None).name == "small"
    assert resolve(cards, EMBEDDING, "big", None).name == "big"
    assert resolve(cards, EMBEDDING, "/models/big", None).name == "big"  # the configured source
    assert resolve(cards, EMBEDDING, None, "fp-big").name == "big"  # by fingerprint, loaded or not
    with pytest.raises(RequestError) as unknown:
        resolve(cards, EMBEDDING, "rr", None)  # a reranker's name is no embedding model
    assert unknown.value.code is ErrorCode.UNKNOWN_MODEL
    assert unknown.value.to_wire()["served"] == ["small", "big"] and "'small' (/models/small), 'big' (/models/big)" in unknown.value.message
    with pytest.raises(RequestError) as mismatch:
        resolve(cards, EMBEDDING, None, "fp-other")
    assert mismatch.value.code is ErrorCode.MODEL_MISMATCH and mismatch.value.details["actual"] == "fp-small"
    with pytest.raises(RequestError) as both:
        resolve(cards, EMBEDDING, "big", "fp-small")  # a name and another model's fingerprint
    assert both.value.code is ErrorCode.MODEL_MISMATCH


# -- through the socket ----------------------------------------------------------------------------
def test_through_the_socket_a_model_loading_does_not_hold_up_another_models_requests(tmp_path):
    builds = Builds()
    builds.gates["slow"] = threading.Event()
    config = DaemonConfig(endpoint=f"ipc://{tmp_path}/s/d.sock", embedding=ModelSettings("/models/fast"),
                          reranker=None, warmup=False, batching=Batching(max_batch_size=8, prep_workers=1))
    holder: dict = {}

    def load(backends, step):
        holder["server"].engine.models.register(card("fast", default=True), builds("fast"))
        holder["server"].engine.models.register(card("slow"), builds("slow"))
        holder["server"].engine.models.load_now("embedding:fast", step)  # as at-start loads the defaults

    server = Server(config, loader=load)
    holder["server"] = server
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        assert server.engine.wait_loaded(10)
        from qwen3vl_client.client import Client
        with Client(config.endpoint, timeout=30) as slow_client:
            waiting = threading.Thread(target=lambda: holder.update(slow=slow_client.embed(["s"], model="slow")))
            waiting.start()
            assert builds.started["slow"].wait(5)
            replies = exchange(config.endpoint, [{"op": "embed", "id": i, "inputs": ["t"], "model": "fast"}
                                                 for i in range(5)])
            health = exchange(config.endpoint, [{"op": "health"}])[0]
            assert all(r["ok"] for r in replies)
            assert {m["name"]: m["state"] for m in health["models"]} == {"fast": "loaded", "slow": "loading"}
            builds.gates["slow"].set()
            waiting.join(10)
            assert holder["slow"].model == "/models/slow"
    finally:
        builds.gates["slow"].set()
        server.request_stop()
        thread.join(30)


@pytest.mark.parametrize("op, body", [("embed", {"inputs": ["x"]}), ("rerank", {"query": "q", "documents": ["d"]})])
@pytest.mark.parametrize("value", [7, "", "x" * 257, ["small"], {"name": "small"}, True])
def test_a_model_field_that_is_not_a_name_is_an_invalid_request_naming_it(op, body, value):
    from daemon.config import MediaPolicy
    from qwen3vl_client.limits import Limits
    from qwen3vl_client.protocol import parse_request

    with pytest.raises(RequestError) as err:
        parse_request({"op": op, **body, "model": value}, Limits(), MediaPolicy())
    assert err.value.code is ErrorCode.INVALID_REQUEST and err.value.message.startswith("model:")
    assert parse_request({"op": op, **body, "model": None}, Limits(), MediaPolicy()).model is None


# -- the hostile review's findings -----------------------------------------------------------------
def test_a_keep_alive_of_years_does_not_stop_the_loader(engines):
    from daemon.loading.catalog import MAX_DURATION_S

    builds, residency = Builds(), Residency()
    engine = engines(residency, [(card("a", default=True, keep_alive_s=MAX_DURATION_S), builds("a")),
                                 (card("b"), builds("b"))])
    for key in ("embedding:a", "embedding:b"):  # b's load comes after a's keep-alive began
        done = Done()
        engine.submit(job(key), done)
        assert not isinstance(done.wait(), RequestError), done.outcome
    with pytest.raises(CatalogError, match="longer than ten years"):
        parse_duration("999999999d")


def test_models_only_queued_to_load_hold_no_memory(engines):
    builds, residency = Builds(), Residency(gate=gate_of(15))  # room for one model at a time
    builds.gates["c"] = threading.Event()
    engine = engines(residency, [(card(n, default=n == "a", estimate_mb=10), builds(n)) for n in "abc"])
    answers = {n: Done() for n in "cab"}
    for name, done in answers.items():  # c loads; a and b wait their turn
        engine.submit(job(f"embedding:{name}"), done)
        assert builds.started["c"].wait(5)
    builds.gates["c"].set()
    for name, done in answers.items():
        assert not isinstance(done.wait(), RequestError), (name, done.outcome)
    assert {n: residency.state(f"embedding:{n}") for n in "abc"} == {
        "a": ModelState.UNLOADED, "b": ModelState.LOADED, "c": ModelState.UNLOADED}


def test_a_load_nobody_waits_for_any_more_is_skipped(engines):
    builds, residency = Builds(), Residency()
    builds.gates["first"] = threading.Event()
    engine = engines(residency, [(card("first", default=True), builds("first")), (card("late"), builds("late")),
                                 (card("probe"), builds("probe"))])
    engine.submit(job("embedding:first"), Done())
    assert builds.started["first"].wait(5)
    gone = Done()
    engine.submit(job("embedding:late", deadline_ms=50), gone)  # queued behind first's load
    time.sleep(0.1)
    engine.expire()
    assert gone.wait().code is ErrorCode.DEADLINE_EXCEEDED
    probe = Done()
    engine.submit(job("embedding:probe"), probe)  # queued behind late: its answer means late's turn is past
    builds.gates["first"].set()
    assert not isinstance(probe.wait(), RequestError)
    assert builds.count.get("late") is None and residency.state("embedding:late") is ModelState.UNLOADED


def test_a_refused_admission_leaves_its_model_unheld(engines):
    builds, residency = Builds(), Residency()
    engine = engines(residency, [(card("a", default=True), builds("a"))],
                     batching=Batching(max_batch_size=8, prep_workers=1, max_wait_ms=0.0, max_queued_inputs=1))
    item = InputItem("inputs[0]", texts=("x",))
    two = Job(size=2, tasks=[Task("embedding:a", i, EmbedWork(item, None), f"inputs[{i}]") for i in range(2)])
    with pytest.raises(RequestError):
        engine.submit(two, Done())
    assert residency.rows()[0]["active"] == 0


def test_names_that_read_as_fingerprints_or_as_another_models_path_are_refused():
    with pytest.raises(CatalogError, match="reads as a fingerprint"):
        check_names([(EMBEDDING, ModelSettings("/m/x", alias="0123456789abcdef0123"))])
    with pytest.raises(CatalogError, match="also the path of another"):
        check_names([(EMBEDDING, ModelSettings("ckptA", alias="x")), (EMBEDDING, ModelSettings("/m/b", alias="ckptA"))])


def test_a_renamed_model_is_still_found_by_its_paths_last_part_when_only_one_has_it():
    cards = [card("small", default=True), card("big")]  # sources /models/small, /models/big
    renamed = [replace(c, name=f"n{i}") for i, c in enumerate(cards)]
    assert resolve(renamed, EMBEDDING, "big", None).name == "n1"
    twins = [replace(cards[0], name="one", source="/a/model"), replace(cards[1], name="two", source="/b/model")]
    with pytest.raises(RequestError) as ambiguous:
        resolve(twins, EMBEDDING, "model", None)
    assert ambiguous.value.code is ErrorCode.UNKNOWN_MODEL


def test_a_fingerprint_no_model_has_is_refused_listing_every_models_fingerprint():
    cards = [card("small", default=True), card("big")]
    with pytest.raises(RequestError) as err:
        resolve(cards, EMBEDDING, None, "f" * 20)
    assert err.value.code is ErrorCode.MODEL_MISMATCH and err.value.details == {"expected": "f" * 20,
                                                                                 "actual": "fp-small"}
    assert "'small' fp-small, 'big' fp-big" in err.value.message
