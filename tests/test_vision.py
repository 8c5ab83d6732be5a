"""The vision path (daemon/media) gives what the processor's path gives: the same ids and, bit for
bit, the same pixel values, on a table of images of every size, shape and mode a client may send;
the official resize; the image cache; and the processor's path where the layout cannot be trusted."""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.bounded import BoundedCache
from daemon.config import ModelSettings, MediaPolicy
from qwen3vl_client.errors import ErrorCode, RequestError
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import InputItem, MediaSource, VideoSource
from daemon.inputs.media.batch import PixelWriter
from daemon.inputs.media.pixels import PatchLayout, resized_image
from daemon.models import IMAGE_FACTOR, MAX_PIXELS, MIN_PIXELS, EmbeddingModel, RerankerModel

CPU = torch.device("cpu")


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """RGB with smooth fields and grain, as photos decode."""
    width, height = size
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _sixteen_bit_png() -> bytes:
    ramp = (np.arange(90 * 70, dtype=np.uint32).reshape(70, 90) * 37 % 65536).astype(np.uint16)
    return _encoded(Image.fromarray(ramp), "PNG")


def _rgba_png() -> bytes:
    photo = np.asarray(_photo((80, 64), 3))
    alpha = (np.arange(80 * 64).reshape(64, 80) % 256).astype(np.uint8)[..., None]
    return _encoded(Image.fromarray(np.concatenate([photo, alpha], axis=2), "RGBA"), "PNG")


def _palette_png(transparent: bool) -> bytes:
    image = _photo((75, 60), 4).convert("P", palette=Image.ADAPTIVE, colors=64)
    return _encoded(image, "PNG", **({"transparency": 0} if transparent else {}))


TABLE = {
    "1x1 RGB PNG": lambda: _encoded(_photo((1, 1)), "PNG"),
    "3x5 RGB PNG": lambda: _encoded(_photo((3, 5)), "PNG"),
    "33x31 RGB PNG": lambda: _encoded(_photo((33, 31)), "PNG"),
    "448x448 JPEG": lambda: _encoded(_photo((448, 448), 1), "JPEG", quality=90),
    "640x480 JPEG (no resize)": lambda: _encoded(_photo((640, 480), 2), "JPEG"),
    "801x599 JPEG (resized)": lambda: _encoded(_photo((801, 599), 3), "JPEG"),
    "2000x1500 JPEG (over the pixel limit)": lambda: _encoded(_photo((2000, 1500), 4), "JPEG"),
    "1000x30 PNG (wide)": lambda: _encoded(_photo((1000, 30), 5), "PNG"),
    "30x1000 PNG (tall)": lambda: _encoded(_photo((30, 1000), 6), "PNG"),
    "4000x20 PNG (ratio 200)": lambda: _encoded(_photo((4000, 20), 7), "PNG"),
    "grayscale PNG": lambda: _encoded(_photo((90, 70), 8).convert("L"), "PNG"),
    "grayscale + alpha PNG": lambda: _encoded(_photo((90, 70), 9).convert("LA"), "PNG"),
    "1-bit PNG": lambda: _encoded(_photo((90, 70), 10).convert("1"), "PNG"),
    "palette PNG": lambda: _palette_png(False),
    "palette PNG with transparency": lambda: _palette_png(True),
    "RGBA PNG": _rgba_png,
    "16-bit grayscale PNG": _sixteen_bit_png,
    "CMYK JPEG": lambda: _encoded(_photo((120, 90), 11).convert("CMYK"), "JPEG"),
    "progressive JPEG": lambda: _encoded(_photo((300, 200), 12), "JPEG", progressive=True, quality=85),
    "grayscale JPEG": lambda: _encoded(_photo((100, 80), 13).convert("L"), "JPEG"),
    "WebP": lambda: _encoded(_photo((130, 97), 14), "WEBP", quality=80),
    "WebP with alpha": lambda: _encoded(Image.open(io.BytesIO(_rgba_png())), "WEBP", lossless=True),
}


@pytest.fixture(scope="module")
def embedder(tiny_dir) -> EmbeddingModel:
    return EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32", max_length=100000), MediaReader(MediaPolicy()))


def _image_item(data: bytes, text: str = "a caption") -> InputItem:
    return InputItem("inputs[0]", texts=(text,), images=(MediaSource("bytes", data, "inputs[0].image[0]"),))


def _pixels(model, features):
    """The pixel rows the vision path gives a prepared input: images, then videos."""
    return (model.layout.written(list(features.images), CPU),
            model.layout.written([v.pixels for v in features.videos], CPU))


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_kind_of_image_gets_the_processors_ids_and_pixels_bit_for_bit(embedder, name):
    item = _image_item(TABLE[name]())
    ours, theirs = embedder.prepare(item), embedder.prepare(item, fast=False)
    assert ours.images and theirs.pixel_values is not None  # the two paths
    assert ours.input_ids == theirs.input_ids
    images, _ = _pixels(embedder, ours)
    assert images.dtype == theirs.pixel_values.dtype and torch.equal(images, theirs.pixel_values)
    assert [list(p.grid) for p in ours.images] == theirs.image_grid_thw.tolist()


@pytest.mark.parametrize("name", ["1x1 RGB PNG", "801x599 JPEG (resized)", "CMYK JPEG", "RGBA PNG", "16-bit grayscale PNG"])
def test_the_resize_is_qwen_vl_utils_fetch_image(name):
    from qwen_vl_utils import fetch_image

    image = Image.open(io.BytesIO(TABLE[name]()))
    image.load()
    ours = resized_image(image, MIN_PIXELS, MAX_PIXELS, IMAGE_FACTOR)
    theirs = fetch_image({"image": image, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}, image_patch_size=16)
    assert ours.size == theirs.size and ours.mode == theirs.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_an_aspect_ratio_over_the_official_limit_is_refused_by_both_paths(embedder):
    item = _image_item(_encoded(_photo((4020, 20)), "PNG"))
    for fast in (True, False):
        with pytest.raises(Exception) as info:
            embedder.prepare(item, fast=fast)
        assert "inputs[0].image[0]" in str(info.value) and "aspect ratio" in str(info.value)


@pytest.mark.parametrize("count, size", [(1, (96, 64)), (2, (96, 64)), (3, (96, 64)), (7, (96, 64)), (4, (448, 448)),
                                         (3, (640, 360)), (70, (64, 64))])
def test_video_frames_get_the_processors_ids_and_pixels_bit_for_bit(embedder, count, size):
    """Frames resized per frame and as a video (96x64), at their size already (448x448), sampled (70)."""
    frames = tuple(MediaSource("bytes", _encoded(_photo(size, k), "JPEG"), f"inputs[0].video[0].frames[{k}]")
                   for k in range(count))
    item = InputItem("inputs[0]", texts=("a clip",), videos=(VideoSource("inputs[0].video[0]", frames=frames),),
                     images=(MediaSource("bytes", TABLE["CMYK JPEG"](), "inputs[0].image[0]"),))
    ours, theirs = embedder.prepare(item), embedder.prepare(item, fast=False)
    assert ours.input_ids == theirs.input_ids
    images, videos = _pixels(embedder, ours)
    assert torch.equal(images, theirs.pixel_values) and torch.equal(videos, theirs.pixel_values_videos)


def test_a_video_file_gets_the_processors_ids_and_pixels(tiny_dir, media_dir):
    model = EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32"),
                           MediaReader(MediaPolicy(allowed_roots=(media_dir,))))
    item = InputItem("inputs[0]", videos=(VideoSource("inputs[0].video[0]", file=MediaSource(
        "path", str(media_dir / "clip.mp4"), "inputs[0].video[0]")),), fps=4.0)
    ours, theirs = model.prepare(item), model.prepare(item, fast=False)
    assert ours.input_ids == theirs.input_ids
    assert torch.equal(_pixels(model, ours)[1], theirs.pixel_values_videos)


@pytest.mark.parametrize("model_cls", [EmbeddingModel, RerankerModel])
def test_a_batch_collated_after_a_larger_one_keeps_its_images_and_videos_apart(tiny_dir, model_cls):
    """The CPU batch buffer is reused: a batch's image and video rows must never share its storage."""
    model = model_cls(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy()))
    frames = tuple(MediaSource("bytes", _encoded(_photo((128, 96), k), "PNG"), "f") for k in range(6))
    big = InputItem("inputs[0]", videos=(VideoSource("v", frames=frames),))
    mixed = InputItem("inputs[1]", images=(MediaSource("bytes", TABLE["WebP"](), "i"),),
                      videos=(VideoSource("v", frames=frames[:2]),))

    def prepared(item, fast=True):
        if model_cls is EmbeddingModel:
            return model.prepare(item, fast=fast)
        return model.prepare(InputItem("query", texts=("q",)), item, fast=fast)

    model._collate([prepared(big)])
    got = model._collate([prepared(mixed)])
    official = prepared(mixed, fast=False)
    assert torch.equal(got["pixel_values"], official.pixel_values)
    assert torch.equal(got["pixel_values_videos"], official.pixel_values_videos)


def test_the_layout_probe_holds_every_value_of_every_channel(embedder):
    """`PatchLayout.matches` proves the normalisation elementwise: its probe must hold all 256 values."""
    side = 4 * embedder.layout.patch * embedder.layout.merge
    ramp = np.arange(side * side, dtype=np.int64).reshape(side, side, 1)
    probe = ((ramp * np.array([1, 7, 13]) + np.array([0, 85, 170])) % 256).astype(np.uint8)  # odd steps: all 256
    assert all(len(np.unique(probe[..., c])) == 256 for c in range(3))


def _checkpoint_with(tiny_dir, tmp_path, **changes):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, copy)
    config = json.loads((copy / "processor_config.json").read_text())
    for key, value in changes.items():
        which, field = key.split("__")
        config[which][field] = value
    (copy / "processor_config.json").write_text(json.dumps(config))
    return copy


def test_per_channel_means_and_stds_keep_the_vision_path_and_its_exactness(tiny_dir, tmp_path):
    clip = {"image_processor__image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor__image_std": [0.26862954, 0.26130258, 0.27577711],
            "video_processor__image_mean": [0.48145466, 0.4578275, 0.40821073],
            "video_processor__image_std": [0.26862954, 0.26130258, 0.27577711]}
    model = EmbeddingModel(ModelSettings(str(_checkpoint_with(tiny_dir, tmp_path, **clip)), dtype="float32"),
                           MediaReader(MediaPolicy()))
    assert model.vision
    item = _image_item(TABLE["801x599 JPEG (resized)"]())
    ours, theirs = model.prepare(item), model.prepare(item, fast=False)
    assert torch.equal(_pixels(model, ours)[0], theirs.pixel_values)


def test_a_processor_the_layout_cannot_describe_keeps_the_processors_path(tiny_dir, tmp_path, caplog):
    odd = _checkpoint_with(tiny_dir, tmp_path, video_processor__image_mean=[0.4, 0.5, 0.6])
    with caplog.at_level(logging.WARNING):
        model = EmbeddingModel(ModelSettings(str(odd), dtype="float32"), MediaReader(MediaPolicy()))
    assert not model.vision and "vision fast path disabled" in caplog.text
    features = model.prepare(_image_item(TABLE["448x448 JPEG"]()))
    assert features.pixel_values is not None and not features.images


def test_an_image_sent_again_is_not_decoded_again(tiny_dir):
    cache = BoundedCache(64 * 1024 * 1024)
    model = EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy(), cache))
    data = TABLE["801x599 JPEG (resized)"]()
    first = model.prepare(_image_item(data, "one"))
    hits = cache.hits
    again = model.prepare(_image_item(data, "another caption"))
    assert cache.hits == hits + 1 and again.images[0] is first.images[0]
    other = model.prepare(_image_item(TABLE["WebP"](), "one"))
    assert other.images[0] is not first.images[0] and cache.hits == hits + 1


def test_the_image_cache_is_bounded_by_bytes(tiny_dir):
    cache = BoundedCache(1024 * 1024)
    model = EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy(), cache))
    for seed in range(8):
        model.prepare(_image_item(_encoded(_photo((448, 448), seed), "PNG")))  # 0.6 MB of pixels each
        assert cache.size_bytes <= 1024 * 1024
    model.prepare(_image_item(TABLE["2000x1500 JPEG (over the pixel limit)"]()))  # larger than the cache
    assert cache.size_bytes <= 1024 * 1024


def test_a_reranked_image_shared_by_many_documents_is_prepared_once(tiny_dir):
    cache = BoundedCache(64 * 1024 * 1024)
    model = RerankerModel(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy(), cache))
    query = InputItem("query", texts=("what is shown",))
    data = TABLE["448x448 JPEG"]()
    docs = [InputItem(f"documents[{i}]", texts=(f"doc {i}",), images=(MediaSource("bytes", data, f"documents[{i}].image[0]"),))
            for i in range(16)]
    prepared = model.prepare_many([(query, d, None) for d in docs])
    assert len({id(f.images[0]) for f in prepared}) == 1
    assert cache.hits >= 15


def test_the_layout_is_read_from_the_processor(embedder):
    assert embedder.layout == PatchLayout(16, 2, 2, (127.5,) * 3, (127.5,) * 3)
    assert embedder.layout.width == 3 * 2 * 16 * 16


class _StagedWriter(PixelWriter):
    """The accelerator's path (bytes staged back to back, sent, laid out there) with the CPU as device."""

    def _accelerated(self) -> bool:
        return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_accelerator_path_gives_the_processors_pixels_in_the_models_dtype(embedder, dtype):
    items = [_image_item(TABLE[name]()) for name in ("448x448 JPEG", "CMYK JPEG", "RGBA PNG", "1x1 RGB PNG")]
    frames = tuple(MediaSource("bytes", _encoded(_photo((96, 64), k), "PNG"), "f") for k in range(3))
    items.append(InputItem("inputs[4]", videos=(VideoSource("v", frames=frames),)))
    ours = [embedder.prepare(item) for item in items]
    theirs = [embedder.prepare(item, fast=False) for item in items]
    images = [p for f in ours for p in f.images]
    videos = [v.pixels for f in ours for v in f.videos]
    staged = _StagedWriter(embedder.layout, CPU, dtype)
    (pixels, grid), (video_pixels, video_grid) = staged.write(images, videos)
    want = torch.cat([f.pixel_values for f in theirs if f.pixel_values is not None]).to(dtype)
    assert pixels.dtype == dtype and torch.equal(pixels, want)
    assert torch.equal(video_pixels, theirs[4].pixel_values_videos.to(dtype))
    assert grid.tolist() == [list(p.grid) for p in images] and video_grid.tolist() == [list(videos[0].grid)]


@pytest.mark.parametrize("texts, token", [(("<|image", "_pad|>"), "<|image_pad|>"), (("<|vid", "eo_pad|>"), "<|video_pad|>"),
                                          (("a <|ima", "ge_p", "ad|> b"), "<|image_pad|>")])
def test_texts_that_join_into_a_vision_pad_are_refused_by_both_paths(embedder, texts, token):
    for images in ((), (MediaSource("bytes", TABLE["WebP"](), "inputs[0].image[0]"),)):
        item = InputItem("inputs[0]", texts=texts, images=images)
        for fast in (True, False):
            with pytest.raises(RequestError) as info:
                embedder.prepare(item, fast=fast)
            assert info.value.code == ErrorCode.INPUT_ERROR
            assert info.value.message.startswith(f"inputs[0].text[{len(texts) - 1}]") and token in info.value.message


def test_a_rerank_query_whose_texts_join_into_a_pad_is_named_as_the_query(tiny_dir):
    model = RerankerModel(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy()))
    query = InputItem("query", texts=("<|image", "_pad|>"))
    document = InputItem("documents[0]", images=(MediaSource("bytes", TABLE["WebP"](), "documents[0].image[0]"),))
    (result,) = model.prepare_many([(query, document, None)])
    assert isinstance(result, RequestError) and result.message.startswith("query.text[1]")


def test_one_clients_split_pad_never_fails_another_clients_batch(client, daemon):
    """The two requests share forwards; before, the split pad made every forward it was in fail."""
    victim_inputs = [{"image": TABLE["448x448 JPEG"](), "text": f"victim {i}"} for i in range(12)]
    attacker_inputs = [{"text": ["<|image", "_pad|>"]}] * 12
    results: dict = {}

    def send(name, inputs):
        with daemon.client() as c:
            try:
                results[name] = c.embed(inputs)
            except Exception as exc:  # noqa: BLE001 (what it is, is what the test checks)
                results[name] = exc

    for _ in range(3):
        threads = [threading.Thread(target=send, args=("victim", victim_inputs)),
                   threading.Thread(target=send, args=("attacker", attacker_inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not isinstance(results["victim"], Exception), results["victim"]
        assert len(results["victim"].embeddings) == 12
        assert getattr(results["attacker"], "code", None) == "input_error"
        assert "inputs[0].text[1]" in str(results["attacker"])


def test_an_aspect_ratio_of_200_is_served_by_both_paths_alike(embedder):
    item = _image_item(_encoded(_photo((6600, 33)), "PNG"))  # resized to 6592x32: the official fetch runs once
    ours, theirs = embedder.prepare(item), embedder.prepare(item, fast=False)
    assert torch.equal(_pixels(embedder, ours)[0], theirs.pixel_values)


def _rgb_with_transparency_key() -> bytes:
    image = _photo((70, 50), 21)
    key = image.getpixel((3, 3))
    return _encoded(image, "PNG", transparency=key)


def test_models_whose_processors_convert_differently_do_not_share_cached_pixels(tiny_dir, tmp_path):
    cache = BoundedCache(64 * 1024 * 1024)
    embedder = EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy(), cache))
    other = _checkpoint_with(tiny_dir, tmp_path, image_processor__do_convert_rgb=False)
    reranker = RerankerModel(ModelSettings(str(other), dtype="float32"), MediaReader(MediaPolicy(), cache))
    query = InputItem("query", texts=("q",))
    item = _image_item(_rgb_with_transparency_key())
    embedder.prepare(item)  # cached under the embedding model's conversion
    ours, theirs = reranker.prepare(query, item), reranker.prepare(query, item, fast=False)
    assert torch.equal(_pixels(reranker, ours)[0], theirs.pixel_values)


def test_the_load_time_probe_neither_uses_the_cache_nor_depends_on_limits(tiny_dir):
    cache = BoundedCache(64 * 1024 * 1024)
    strict = MediaPolicy(max_image_pixels=100, max_video_pixels=1000)
    model = EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32", max_length=32), MediaReader(strict, cache))
    assert model.vision and (cache.hits, cache.misses, cache.size_bytes) == (0, 0, 0)
    assert model.max_length == 32 and model.media.policy is strict


def test_video_frames_of_sizes_the_official_resize_cannot_stack_are_an_input_error_naming_the_video(embedder):
    frames = (MediaSource("bytes", _encoded(_photo((64, 64)), "PNG"), "f0"),
              MediaSource("bytes", _encoded(_photo((200, 64), 1), "PNG"), "f1"))
    item = InputItem("inputs[0]", videos=(VideoSource("inputs[0].video[0]", frames=frames),))
    with pytest.raises(RequestError) as info:
        embedder.prepare(item)
    assert info.value.code == ErrorCode.INPUT_ERROR
    assert info.value.message.startswith("inputs[0].video[0]") and "differ in size" in info.value.message


def test_an_undecodable_video_file_is_named_with_the_readers_reason_and_no_source_paths(tiny_dir, media_dir, tmp_path):
    data = (media_dir / "clip.mp4").read_bytes()
    model = EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32"), MediaReader(MediaPolicy()))
    for cut in (data[: len(data) * 9 // 10], data[: len(data) // 2]):
        item = InputItem("inputs[0]", videos=(VideoSource("inputs[0].video[0]", file=MediaSource(
            "bytes", cut, "inputs[0].video[0]")),))
        with pytest.raises(RequestError) as info:
            model.prepare(item)
        message = info.value.message
        assert info.value.code == ErrorCode.INPUT_ERROR and message.startswith("inputs[0].video[0]")
        assert ".cpp" not in message and "/__w/" not in message
