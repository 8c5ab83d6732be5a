"""The bridge as the ecosystem's own clients see it: the official `openai` and `cohere` Python SDKs,
pointed at a real bridge in front of a real daemon (tiny model). No hand-written HTTP here."""

from __future__ import annotations

import base64
from pathlib import Path

import cohere
import numpy as np
import openai
import pytest



@pytest.fixture
def oai(bridge):
    with openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def co(bridge):
    return cohere.Client(api_key="unused", base_url=bridge.url, timeout=60)


TEXTS = ["a red apple", "the stock market fell", "green pears"]


@pytest.fixture
def model(client) -> str:
    """The served model as users name it: its directory's (or hub id's) last component."""
    return Path(client.health()["embedding"]["name"]).name


def test_openai_sdk_gets_the_daemons_float_vectors(oai, client, model):
    got = oai.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    assert [d.index for d in got.data] == [0, 1, 2] and got.usage.prompt_tokens > 0
    np.testing.assert_allclose([d.embedding for d in got.data], client.embed(TEXTS).embeddings, atol=1e-6)


def test_openai_sdk_default_base64_decodes_to_the_same_floats(oai, client, model):
    # Without encoding_format the SDK asks for base64 itself and decodes the little-endian float32.
    got = oai.embeddings.create(model=model, input=TEXTS, dimensions=16)
    np.testing.assert_array_equal(np.array([d.embedding for d in got.data], dtype=np.float32),
                                  client.embed(TEXTS, dimension=16).embeddings)


def test_openai_sdk_explicit_base64_is_the_float32_bytes(oai, client, model):
    got = oai.embeddings.create(model=model, input="a red apple", encoding_format="base64")
    row = np.frombuffer(base64.b64decode(got.data[0].embedding), "<f4")
    np.testing.assert_array_equal(row, client.embed(["a red apple"]).embeddings[0])


@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
def test_openai_sdk_compact_types_through_the_extension_field(oai, client, model, kind):
    ints = oai.embeddings.create(model=model, input=TEXTS, encoding_format="float",
                                 extra_body={"embedding_type": kind})
    raw = oai.embeddings.create(model=model, input=TEXTS, encoding_format="base64",
                                extra_body={"embedding_type": kind})
    want = client.embed(TEXTS, encoding=kind).embeddings
    assert [d.embedding for d in ints.data] == want.tolist()
    assert [base64.b64decode(d.embedding) for d in raw.data] == [row.tobytes() for row in want]


def test_openai_sdk_sees_a_model_mismatch_as_a_conflict(oai, model):
    with pytest.raises(openai.ConflictError) as err:
        oai.embeddings.create(model=model, input="x", extra_body={"expect_fingerprint": "0" * 20})
    assert err.value.body["code"] == "model_mismatch" and err.value.body["expected"] == "0" * 20


def test_openai_sdk_reads_the_fingerprint_header(oai, client, model):
    response = oai.embeddings.with_raw_response.create(model=model, input="x", encoding_format="float")
    assert response.headers["x-model-fingerprint"] == client.health()["embedding"]["fingerprint"]


def test_cohere_sdk_ranks_by_the_daemons_scores(co, client, model):
    scores = client.rerank("fruit", TEXTS).scores
    got = co.rerank(model=model, query="fruit", documents=TEXTS, top_n=2)
    want = sorted(range(3), key=lambda i: (-scores[i], i))[:2]
    assert [r.index for r in got.results] == want
    np.testing.assert_allclose([r.relevance_score for r in got.results], [scores[i] for i in want], atol=1e-6)
    assert got.id and got.meta.tokens.input_tokens > 0


def test_cohere_sdk_without_top_n_gets_every_document(co):
    got = co.rerank(query="fruit", documents=TEXTS)
    assert sorted(r.index for r in got.results) == [0, 1, 2]
    assert [r.relevance_score for r in got.results] == sorted((r.relevance_score for r in got.results), reverse=True)


def test_cohere_sdk_returns_the_documents_when_asked(co):
    got = co.rerank(query="fruit", documents=[{"text": t} for t in TEXTS], return_documents=True)
    assert {r.index: r.document.text for r in got.results} == dict(enumerate(TEXTS))
    assert all(r.document is None for r in co.rerank(query="fruit", documents=TEXTS).results)


def test_cohere_sdk_sees_unsupported_options_as_bad_requests(co):
    with pytest.raises(cohere.errors.BadRequestError) as err:
        co.rerank(query="fruit", documents=TEXTS, max_chunks_per_doc=3)
    assert "max_chunks_per_doc" in str(err.value.body)


def test_openai_sdk_asking_for_another_model_gets_not_found(oai, model):
    with pytest.raises(openai.NotFoundError) as err:
        oai.embeddings.create(model="text-embedding-3-small", input="x")
    assert err.value.body["code"] == "model_not_found" and model in err.value.body["message"]
