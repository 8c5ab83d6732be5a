"""Preemption leaves every output bit-identical: a forward paused between its decoder layers (the
vision tower's and the language model's) while other forwards run gives exactly the tensors of an
unpaused run, for text, image and rerank forwards; on the real tiny checkpoint, in float32 on CPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import gradient_png
from daemon.engine.backends import EmbeddingBackend, EmbedWork, RerankerBackend
from daemon.config import Batching, MediaPolicy, ModelSettings
from qwen3vl_client.protocol import BATCH, INTERACTIVE
from daemon.engine.engine import Engine, EngineState, Job, JobResult, Task
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import InputItem, MediaSource
from daemon.models import EmbeddingModel, RerankerModel


@pytest.fixture(scope="module")
def embedder(tiny_dir) -> EmbeddingModel:
    return EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy()))


@pytest.fixture(scope="module")
def reranker(tiny_dir) -> RerankerModel:
    return RerankerModel(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy()))


def _image(seed: int, where: str, size=(64, 96)) -> MediaSource:
    return MediaSource("bytes", gradient_png(seed, size=size), where)


def _items(seed: int) -> list[InputItem]:
    return [InputItem("inputs[0]", texts=(f"a short text {seed}",)),
            InputItem("inputs[1]", texts=("an image",), images=(_image(seed, "inputs[1].image[0]"),)),
            InputItem("inputs[2]", texts=(f"a somewhat longer text number {seed} " * 4,))]


def _embed_batch(model: EmbeddingModel, seed: int) -> list:
    return [model.prepare(item) for item in _items(seed)]


def _rerank_batch(model: RerankerModel, seed: int) -> list:
    return [model.prepare(InputItem("query", texts=(f"query {seed}",)), item) for item in _items(seed)]


def _layers(model) -> int:
    return len(model.model.visual.blocks) + len(model.model.language_model.layers)


class Pauses:
    """A pause callback that runs `work` at the chosen pauses (all of them by default) and
    counts every pause."""

    def __init__(self, work, at: set[int] | None = None):
        self.work, self.at, self.count, self.results = work, at, 0, []

    def __call__(self) -> None:
        if self.at is None or self.count in self.at:
            self.results.append(self.work())
        self.count += 1


@pytest.mark.parametrize("at", [None, {0}, {3}], ids=["every-layer", "first-layer", "a-middle-layer"])
def test_an_embedding_forward_paused_for_other_embeddings_is_bit_identical(embedder, at):
    batch, other = _embed_batch(embedder, 1), _embed_batch(embedder, 2)
    want, want_other = embedder.embed(batch), embedder.embed(other)
    pauses = Pauses(lambda: embedder.embed(other), at)
    got = embedder.embed(batch, pauses)
    assert pauses.count == _layers(embedder)  # an image in the batch: the vision tower's blocks pause too
    assert torch.equal(got, want)
    assert pauses.results and all(torch.equal(r, want_other) for r in pauses.results)


def test_a_text_only_forward_pauses_between_the_language_models_layers(embedder):
    batch = [embedder.prepare(InputItem("inputs[0]", texts=("only text",)))]
    pauses = Pauses(lambda: None)
    embedder.embed(batch, pauses)
    assert pauses.count == len(embedder.model.language_model.layers)


def test_a_rerank_forward_paused_for_other_reranks_is_bit_identical(reranker):
    batch, other = _rerank_batch(reranker, 3), _rerank_batch(reranker, 4)
    want, want_other = reranker.score(batch), reranker.score(other)
    pauses = Pauses(lambda: reranker.score(other))
    got = reranker.score(batch, pauses)
    assert pauses.count == _layers(reranker)
    assert np.array_equal(got, want) and all(np.array_equal(r, want_other) for r in pauses.results)


def test_forwards_of_the_other_model_inside_a_pause_change_nothing(embedder, reranker):
    batch, other = _embed_batch(embedder, 5), _rerank_batch(reranker, 6)
    want, want_other = embedder.embed(batch), reranker.score(other)
    pauses = Pauses(lambda: reranker.score(other))
    assert torch.equal(embedder.embed(batch, pauses), want)
    assert all(np.array_equal(r, want_other) for r in pauses.results)


def test_the_forwards_run_inside_a_pause_are_not_paused_themselves(embedder):
    batch, other = _embed_batch(embedder, 7), _embed_batch(embedder, 8)
    pauses = Pauses(lambda: embedder.embed(other), at={0})
    embedder.embed(batch, pauses)
    assert pauses.count == _layers(embedder)  # the inner forward's layers called no pause


# -- through the engine ----------------------------------------------------------------------------
class Interrupted:
    """A real backend whose batch-priority forward, at its first pause, has an interactive job
    submitted (prepared inline, so it is ready at once): the engine must run it inside the pause."""

    def __init__(self, backend, interrupt):
        self.backend, self.info, self.interrupt = backend, backend.info, interrupt

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward(self, batch, between_layers=None):
        if between_layers is None:
            return self.backend.forward(batch)
        fired = []

        def pause() -> None:
            if not fired:
                fired.append(True)
                self.interrupt()
            between_layers()

        return self.backend.forward(batch, between_layers=pause)


def _run(engine: Engine, job: Job) -> JobResult:
    done, outcome = threading.Event(), []
    engine.submit(job, lambda result: (outcome.append(result), done.set()))
    assert done.wait(60)
    assert isinstance(outcome[0], JobResult), outcome[0]
    return outcome[0]


def _embed_job(items: list[InputItem], kind: str, priority: str, inline: bool = False) -> Job:
    return Job(size=len(items), tasks=[Task(kind, i, EmbedWork(item, None), item.where) for i, item in enumerate(items)],
               priority=priority, inline=inline)


def test_the_engine_runs_a_query_inside_a_batch_forward_and_both_results_are_exact(embedder):
    kind = "embedding"
    outcomes, engine_box = [], []
    query_items = [InputItem("inputs[0]", texts=("a search query",))]

    def interrupt() -> None:
        engine_box[0].submit(_embed_job(query_items, kind, INTERACTIVE, inline=True), outcomes.append)

    backend = Interrupted(EmbeddingBackend(embedder), interrupt)

    def load(into: dict, step) -> None:
        into[kind] = backend

    engine = Engine(Batching(max_batch_size=8, prep_workers=1, max_wait_ms=0.0), load)
    engine_box.append(engine)
    threading.Thread(target=engine.run, daemon=True).start()
    try:
        assert engine.wait_loaded(30) and engine.state is EngineState.READY
        bulk = _run(engine, _embed_job(_items(9), kind, BATCH))
        assert engine.status().preemptions == 1 and len(outcomes) == 1
        alone_bulk = embedder.embed([embedder.prepare(item) for item in _items(9)]).numpy()
        alone_query = embedder.embed([embedder.prepare(query_items[0])]).numpy()
        assert np.array_equal(np.stack(bulk.values), alone_bulk)
        assert np.array_equal(np.stack(outcomes[0].values), alone_query)
    finally:
        engine.stop()
