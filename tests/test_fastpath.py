"""The text fast path gives exactly the processor path's token ids, for any text."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from daemon.config import MediaPolicy, ModelSettings
from qwen3vl_client.errors import ErrorCode, RequestError
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import InputItem
from daemon.models import EmbeddingModel, RerankerModel

LOOKALIKES = ["<|im_end|>", "<|im_start|>", "<|im_start|>assistant\n", "<|endoftext|>", "<|image_pad|>",
              "<|vision_start|>", "<|im_end", "im_end|>", "<|", "|>", "<think>", "\n<Document>:", "<Query>:",
              "NULL", "\n", "\r\n", " ", "\t", "\u00a0", "\u2028", "e\u0301", "ﬁ", "Å", "🎉", "漢字", "yes", "no"]
texts = st.lists(st.one_of(st.sampled_from(LOOKALIKES), st.text(max_size=24)), max_size=6).map("".join)
instructions = st.one_of(st.none(), texts)
settings_ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["tiny", "qwen3"])
def checkpoint(request) -> str:
    """Both tokenizers: the tiny one trained here, and Qwen3's own (the one Qwen3-VL ships)."""
    return str(request.getfixturevalue("tiny_dir" if request.param == "tiny" else "qwen3_dir"))


@pytest.fixture(scope="module")
def embedder(checkpoint) -> EmbeddingModel:
    return EmbeddingModel(ModelSettings(checkpoint, dtype="float32"), MediaReader(MediaPolicy()))


@pytest.fixture(scope="module")
def reranker(checkpoint) -> RerankerModel:
    return RerankerModel(ModelSettings(checkpoint, dtype="float32"), MediaReader(MediaPolicy()))


def test_fast_path_is_enabled_for_the_qwen3vl_template(embedder, reranker):
    assert embedder.fast is not None and reranker.fast is not None


@settings_
@given(parts=st.lists(texts, max_size=3), instruction=instructions)
def test_embedding_fast_path_ids_equal_the_processor_path(embedder, parts, instruction):
    assume(not any(r in p for p in parts + [instruction or ""] for r in ("<|image_pad|>", "<|video_pad|>")))
    item = InputItem("inputs[0]", texts=tuple(parts))
    assert embedder.prepare(item, instruction).input_ids == embedder.prepare(item, instruction, fast=False).input_ids


@settings_
@given(query=st.lists(texts, max_size=2), document=st.lists(texts, max_size=2), instruction=instructions)
def test_reranker_fast_path_ids_equal_the_processor_path(reranker, query, document, instruction):
    assume(not any(r in p for p in query + document + [instruction or ""] for r in ("<|image_pad|>", "<|video_pad|>")))
    q, d = InputItem("query", texts=tuple(query)), InputItem("documents[0]", texts=tuple(document))
    assert reranker.prepare(q, d, instruction).input_ids == reranker.prepare(q, d, instruction, fast=False).input_ids


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("token", ["<|image_pad|>", "<|video_pad|>"])
def test_texts_carrying_vision_placeholders_are_refused_on_both_paths(embedder, reranker, fast, token):
    item = InputItem("inputs[2]", texts=("fine", f"sneaky {token} text"))
    with pytest.raises(RequestError) as err:
        embedder.prepare(item, fast=fast)
    assert err.value.code == ErrorCode.INPUT_ERROR and err.value.message.startswith("inputs[2].text[1]")
    with pytest.raises(RequestError):
        reranker.prepare(InputItem("query", texts=("q",)), InputItem("documents[0]", texts=(token,)), fast=fast)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(texts, instructions), min_size=1, max_size=8))
def test_inputs_tokenised_together_get_the_ids_each_gets_alone(embedder, reranker, batch):
    """One tokenizer call for a chunk of inputs changes nothing: ids, and which inputs fail."""
    works = [(InputItem(f"inputs[{i}]", texts=(text,)), instruction) for i, (text, instruction) in enumerate(batch)]
    for (item, instruction), together in zip(works, embedder.prepare_many(works)):
        _same_outcome(together, lambda: embedder.prepare(item, instruction, fast=False))
    pairs = [(InputItem("query", texts=(instruction or "q",)), item, None) for item, instruction in works]
    for (query, document, _), together in zip(pairs, reranker.prepare_many(pairs)):
        _same_outcome(together, lambda: reranker.prepare(query, document, fast=False))


def _same_outcome(together, alone) -> None:
    try:
        want = alone().input_ids
    except RequestError as exc:
        assert isinstance(together, RequestError) and together.message == exc.message
    else:
        assert together.input_ids == want


def test_the_real_qwen3_tokenizer_counts_like_qwen3(qwen3_dir):
    """The checkpoint carries Qwen3's vocabulary: the official reranker's yes/no ids and real word pieces."""
    model = RerankerModel(ModelSettings(str(qwen3_dir), dtype="float32"), MediaReader(MediaPolicy()))
    vocab = model.tokenizer.get_vocab()
    assert (vocab["yes"], vocab["no"], model.pad_id) == (9693, 2152, 151643)
    assert model.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"] == [785, 3974, 13876, 38835]
