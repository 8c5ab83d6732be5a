"""The model layer on its own (real tiny checkpoint, no socket): truncation, loading, devices."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import gradient_png
from daemon.config import MediaPolicy, ModelSettings
from qwen3vl_client.errors import ErrorCode, RequestError
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import InputItem, MediaSource
from daemon.loading.devices import cpu_has_native_bf16, resolve_device, resolve_dtype
from daemon.models import EmbeddingModel, ModelLoadError, RerankerModel
from reference import ReferenceReranker

LONG_TEXT = "many words in a very long input that must be cut " * 60


@pytest.fixture(scope="module")
def small_embedder(tiny_dir) -> EmbeddingModel:
    return EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32", max_length=64), MediaReader(MediaPolicy()))


@pytest.fixture(scope="module")
def small_reranker(tiny_dir) -> RerankerModel:
    return RerankerModel(ModelSettings(str(tiny_dir), dtype="float32", max_length=64), MediaReader(MediaPolicy()))


def test_overlong_embedding_input_is_cut_to_max_length_keeping_the_template_ending(small_embedder):
    full_model = EmbeddingModel(ModelSettings(small_embedder.name, dtype="float32", max_length=100000), small_embedder.media)
    item = InputItem("inputs[0]", texts=(LONG_TEXT,))
    full, cut = full_model.prepare(item).input_ids, small_embedder.prepare(item).input_ids
    assert len(full) > 64 and len(cut) == 64
    assert cut[-5:] == full[-5:]  # <|im_end|> \n <|im_start|> assistant \n: the pooled token is the last
    assert cut[:-5] == full[:59]  # the system turn and the start of the text survive, in order


def test_truncation_keeps_every_vision_token(small_embedder):
    item = InputItem("inputs[0]", texts=(LONG_TEXT,), images=(MediaSource("bytes", gradient_png(1), "i"),))
    ids = small_embedder.prepare(item).input_ids
    image_pad = small_embedder.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert len(ids) == 64 and ids.count(image_pad) > 0
    features = small_embedder.prepare(item)
    vectors = small_embedder.embed([features])  # the forward accepts the cut input with all its image tokens
    assert torch.isfinite(vectors).all()


def test_vision_tokens_beyond_the_limit_fail_that_input_clearly(small_embedder):
    big = InputItem("inputs[3]", images=(MediaSource("bytes", gradient_png(2, size=(320, 320)), "inputs[3].image[0]"),))
    with pytest.raises(RequestError) as err:
        small_embedder.prepare(big)
    assert err.value.code == ErrorCode.TOO_LARGE and err.value.message.startswith("inputs[3]")


def test_overlong_rerank_pair_is_cut_like_the_official_code(small_reranker, tiny_dir):
    query, doc = InputItem("query", texts=("a question",)), InputItem("documents[0]", texts=(LONG_TEXT,))
    features = small_reranker.prepare(query, doc)
    assert len(features.input_ids) == 64 + 5
    want = ReferenceReranker(str(tiny_dir)).scores({"texts": ["a question"]}, [{"texts": [LONG_TEXT]}], max_length=64)
    np.testing.assert_allclose(small_reranker.score([features]), want, atol=2e-5)


def test_checkpoint_missing_base_weights_is_refused_at_start(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights[next(k for k in weights if "language_model.layers.0.mlp" in k)]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 1 base-model weight"):
        EmbeddingModel(ModelSettings(str(broken), dtype="float32"), MediaReader(MediaPolicy()))


def test_unfetchable_model_fails_with_one_line_saying_what_to_pass():
    with pytest.raises(ModelLoadError) as err:  # local_files_only: what a machine without network sees
        EmbeddingModel(ModelSettings("Qwen/Qwen3-VL-Embedding-8B", dtype="float32", local_files_only=True), MediaReader(MediaPolicy()))
    message = str(err.value)
    assert "\n" not in message and "Qwen/Qwen3-VL-Embedding-8B" in message and "tiny-checkpoint" in message


def test_auto_dtype_on_a_cpu_is_bfloat16_exactly_where_torch_reports_native_bf16():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() == native
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_unknown_device_and_dtype_are_refused():
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_reranker_drops_the_untied_lm_head_after_taking_the_score_vector(small_reranker):
    assert not hasattr(small_reranker.full_model, "lm_head")
    assert small_reranker.score_vector.shape == (small_reranker.hidden_size,)


@pytest.mark.parametrize("size", [(64, 48), (33, 31), (1000, 30), (30, 1000), (3000, 2000), (2048, 2048), (100, 5000)])
def test_vision_tokens_counted_from_the_header_are_what_the_processor_makes(tiny_dir, size):
    from daemon.models import image_tokens

    model = EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32", max_length=100000), MediaReader(MediaPolicy()))
    ids = model.prepare(InputItem("inputs[0]", images=(MediaSource("bytes", gradient_png(1, size), "x"),))).input_ids
    image_pad = model.tokenizer.convert_tokens_to_ids(model.processor.image_token)
    assert image_tokens(*size, "x") == ids.count(image_pad) + 2  # + vision start and end


def test_an_aspect_ratio_the_official_resize_refuses_is_an_input_error(small_embedder):
    item = InputItem("inputs[0]", images=(MediaSource("bytes", gradient_png(1, (4000, 10)), "inputs[0].image[0]"),))
    with pytest.raises(RequestError) as info:
        small_embedder.prepare(item)
    assert info.value.code == ErrorCode.INPUT_ERROR and info.value.message.startswith("inputs[0].image[0]")


def _collate_row_by_row(model, batch, official) -> dict:
    """The batch tensors written the plain way: one row at a time, the processor's own modality ids,
    and the processor's own pixel values (of `official`, the same inputs prepared by the processor)."""
    width = max(f.tokens for f in batch)
    ids = torch.full((len(batch), width), model.pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, f in enumerate(batch):
        span = slice(0, f.tokens) if model.padding_side == "right" else slice(width - f.tokens, width)
        ids[row, span] = torch.tensor(f.input_ids)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "mm_token_type_ids": torch.tensor(model.processor.create_mm_token_type_ids(ids.tolist())),
            "pixel_values": torch.cat([f.pixel_values for f in official if f.pixel_values is not None])}


@pytest.mark.parametrize("model_cls", [EmbeddingModel, RerankerModel])
def test_a_batch_is_collated_exactly_as_row_by_row(tiny_dir, model_cls):
    model = model_cls(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy()))
    image = MediaSource("bytes", gradient_png(4, size=(64, 96)), "inputs[1].image[0]")
    items = [InputItem("inputs[0]", texts=("short",)), InputItem("inputs[1]", texts=("an image",), images=(image,)),
             InputItem("inputs[2]", texts=("a somewhat longer text " * 3,))]
    if model_cls is EmbeddingModel:
        batch, official = ([model.prepare(item, fast=fast) for item in items] for fast in (True, False))
    else:
        batch, official = ([model.prepare(InputItem("query", texts=("q",)), item, fast=fast) for item in items]
                           for fast in (True, False))
    assert model.vision and batch[1].images and official[1].pixel_values is not None  # the two paths
    assert [f.input_ids for f in batch] == [f.input_ids for f in official]
    assert len({f.tokens for f in batch}) == 3  # every row is padded differently
    got, want = model._collate(batch), _collate_row_by_row(model, batch, official)
    np.testing.assert_array_equal(got.pop("lengths"), [f.tokens for f in batch])
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert set(got) == set(want) | {"image_grid_thw"}
