"""Rerank scores through the live daemon equal the official algorithm's (one forward per pair)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import gradient_png, pil
from qwen3vl_client.protocol import top_indices
from reference import ReferenceReranker

ATOL = 2e-5


@pytest.fixture(scope="module")
def ref(tiny_dir) -> ReferenceReranker:
    return ReferenceReranker(str(tiny_dir))


def test_text_scores_match_the_official_algorithm_in_document_order(client, ref):
    documents = ["the fox", "a much longer document about foxes " * 12, "ünïcødé", "", "dogs"]
    got = client.rerank("what does the fox say", documents).scores
    want = ref.scores({"texts": ["what does the fox say"]}, [{"texts": [d]} for d in documents])
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert all(0.0 < s < 1.0 for s in got)


def test_instruction_is_used_as_given(client, ref):
    got = client.rerank("q", ["d1", "d2"], instruction="Find code  ").scores
    want = ref.scores({"texts": ["q"]}, [{"texts": ["d1"]}, {"texts": ["d2"]}], instruction="Find code  ")
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert not np.allclose(got, client.rerank("q", ["d1", "d2"]).scores, atol=1e-5)


def test_multimodal_query_and_documents_match_the_official_algorithm(client, ref):
    image, frames = gradient_png(2), [gradient_png(6), gradient_png(7), gradient_png(8)]
    query = {"text": "find the picture", "image": image}
    documents = [{"image": gradient_png(3)}, {"video": frames, "text": "a clip"}, "plain text", {}]
    got = client.rerank(query, documents).scores
    want = ref.scores({"texts": ["find the picture"], "images": [pil(image)]},
                      [{"images": [pil(gradient_png(3))]},
                       {"videos": [[pil(f) for f in frames]], "texts": ["a clip"]},
                       {"texts": ["plain text"]}, {}])
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_many_documents_are_scored_in_batches_without_changing_scores(client, ref):
    documents = [f"document number {i} " + "word " * (i % 9) for i in range(20)]  # 3 forwards of up to 8
    got = client.rerank("query", documents).scores
    alone = [client.rerank("query", [d]).scores[0] for d in documents]
    np.testing.assert_allclose(got, alone, atol=ATOL)
    np.testing.assert_allclose(got, ref.scores({"texts": ["query"]}, [{"texts": [d]} for d in documents]), atol=ATOL)


def test_reply_carries_model_and_token_count(client, tiny_dir):
    reply = client.request({"op": "rerank", "query": "q", "documents": ["a", "b"]})
    assert reply["ok"] and reply["model"] == str(tiny_dir) and reply["tokens"] > 2 * 40


DOCS = ["apples are fruit", "the market fell", "pears", "apples are fruit", "rain", "fruit salad"]


@pytest.mark.parametrize("top_n", [1, 3, 6, 50])
def test_top_lists_the_best_documents_by_descending_score_ties_by_index(client, top_n):
    got = client.rerank("fruit", DOCS, top_n=top_n)
    assert len(got.scores) == len(DOCS)  # the scores stay, in document order
    assert got.top == sorted(range(len(DOCS)), key=lambda i: (-got.scores[i], i))[:top_n]
    assert len(got.top) == min(top_n, len(DOCS))


def test_scores_are_in_document_order_with_or_without_top_n(client):
    np.testing.assert_allclose(client.rerank("fruit", DOCS, top_n=2).scores, client.rerank("fruit", DOCS).scores,
                               atol=ATOL)


def test_top_is_absent_unless_asked_for(client):
    reply = client.request({"op": "rerank", "query": "q", "documents": ["a", "b"]})
    assert reply["ok"] and "top" not in reply
    assert client.rerank("q", ["a", "b"]).top is None


def test_equal_scores_rank_by_document_index():
    assert top_indices([0.5, 0.9, 0.5, 0.9, 0.1], 4) == [1, 3, 0, 2]
    assert top_indices([0.2], 5) == [0]
