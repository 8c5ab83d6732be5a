"""The two Qwen3-VL models, faithful to the official Qwen3-VL-Embedding and Qwen3-VL-Reranker code.

Work is split in two halves so that a batcher can overlap them: `prepare` turns one input into token
ids and pixel tensors on the CPU (chat template, media, processor, truncation), and `embed`/`score`
run one forward over a list of prepared inputs. Preparing inputs one at a time and concatenating them
gives exactly what the official code gets from one processor call over the whole batch: the
processors treat each image and video on its own.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import itertools
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import MediaPolicy, ModelSettings
from daemon.errors import ModelLoadError, attempt, first_line
from daemon.inputs.fastpath import build_fast_path
from daemon.inputs.media.batch import PixelWriter
from daemon.inputs.media.pixels import PatchLayout, Pixels, resized_image, same_pixels
from daemon.inputs.media.tokens import Video, VisionTokens
from daemon.inputs.media.video import VideoError, read_video
from daemon.inputs.media_reader import MediaReader
from daemon.loading.build import Background, Loaded, WeightsRead, from_files
from daemon.loading.devices import resolve_device, resolve_dtype
from daemon.loading.weights import FP8, NONE, FormatError, check_format, convert, parse_format
from qwen3vl_client.errors import RequestError, input_error, too_large
from qwen3vl_client.inputs import InputItem, MediaSource, VideoSource

log = logging.getLogger(__name__)

# Official constants (Qwen3-VL-Embedding / Qwen3-VL-Reranker).
IMAGE_PATCH_SIZE = 16
IMAGE_FACTOR = IMAGE_PATCH_SIZE * 2
MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_PIXELS = 1800 * IMAGE_FACTOR * IMAGE_FACTOR
FRAME_MAX_PIXELS = 768 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_TOTAL_PIXELS = 10 * FRAME_MAX_PIXELS
DEFAULT_FPS = 1.0
MAX_FRAMES = 64
EMBED_DEFAULT_INSTRUCTION = "Represent the user's input."
RERANK_DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
RERANK_SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)


NO_MEDIA: tuple[tuple, tuple] = ((), ())  # a text-only input's images and videos
LAUNCH_AHEAD_LAYERS = 2  # on CUDA, how far a preemptible forward's launches may run ahead of the device
PROBE_MAX_LENGTH = 4096  # tokens the vision path's probe may take (it needs about 300)


class UndecodableVideo(Exception):
    """torchcodec could not decode a video's frames."""


def _no_fallback_reader(_ele: dict):
    raise UndecodableVideo


def use_torchcodec_only() -> None:
    """qwen_vl_utils falls back to torchvision.io.read_video when torchcodec fails on a file, and
    torchvision 0.29 has no read_video: the fallback could only fail, with a misleading message.
    Make that failure say what happened. Also pick the reader now, while its one-time banner can be
    kept off stderr."""
    from qwen_vl_utils import vision_process

    vision_process.VIDEO_READER_BACKENDS["torchvision"] = _no_fallback_reader
    with contextlib.redirect_stderr(io.StringIO()):
        vision_process.get_video_reader_backend()


# -- device and dtype ------------------------------------------------------------------------------
def import_libraries() -> None:
    """Import what loading a model needs (torch, transformers' Qwen3-VL classes and processor,
    qwen_vl_utils) once, up front, so that the load report can tell import time from weights."""
    import torch  # noqa: F401
    import transformers.models.qwen3_vl.modeling_qwen3_vl  # noqa: F401
    import transformers.models.qwen3_vl.processing_qwen3_vl  # noqa: F401
    import qwen_vl_utils  # noqa: F401
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration  # noqa: F401

    _embedding_class()


@functools.cache
def _embedding_class():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLPreTrainedModel

    class Qwen3VLForEmbedding(Qwen3VLPreTrainedModel):
        """The base model under the `model.` prefix, as the official embedding checkpoints store it."""

        _checkpoint_conversion_mapping: dict = {}

        def __init__(self, config):
            super().__init__(config)
            self.model = Qwen3VLModel(config)
            self.post_init()

    return Qwen3VLForEmbedding


def _checked_format(settings: ModelSettings, device) -> str:
    try:
        fmt = parse_format(settings.quantize)
        check_format(fmt, device)
    except FormatError as exc:
        raise ModelLoadError(str(exc)) from None
    return fmt


def _load_processor(settings: ModelSettings, files: str, padding_side: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(
            files, padding_side=padding_side, local_files_only=settings.local_files_only,
            trust_remote_code=False,
        )
    except OSError as exc:
        raise _unfetchable(settings, exc) from None
    except Exception as exc:
        raise ModelLoadError(f"cannot load the processor of {settings.name!r}: {first_line(exc)}") from None


@contextlib.contextmanager
def _reading_media(where: str):
    """qwen_vl_utils' reading of checked media: what it raises is the input's decoding failure."""
    try:
        yield
    except UndecodableVideo:
        raise input_error(f"{where}: the video's frames cannot be decoded (a corrupt or truncated file)") from None
    except VideoError as exc:
        raise input_error(f"{where}: {exc}") from None
    except RequestError:
        raise
    except Exception as exc:  # media were read and checked before; this is a decoding failure
        raise input_error(f"{where}: cannot read media ({type(exc).__name__}: {str(exc)[:160]})") from None


def _directory_of(settings: ModelSettings) -> Path:
    """The directory of `settings.name`: itself, or its hub snapshot (fetched unless local_files_only)."""
    from daemon.loading.fingerprint import model_directory

    return model_directory(settings.name, settings.local_files_only)


def _unfetchable(settings: ModelSettings, exc: Exception) -> ModelLoadError:
    from daemon.loading.preflight import looks_local

    reason = first_line(exc)[:160]
    if looks_local(settings.name):
        return ModelLoadError(f"cannot read model files in {settings.name!r} ({reason}); check the directory "
                              "and its permissions")
    return ModelLoadError(
        f"cannot load model {settings.name!r}: it is not a local checkpoint and could not be downloaded "
        f"({reason}); pass a local checkpoint directory, or build a test checkpoint with "
        "`qwen3vl-daemon tiny-checkpoint DIR` and pass DIR"
    )


# -- prepared inputs ------------------------------------------------------------------------------
@dataclass
class Features:
    """One input ready for a forward: token ids plus its pixel tensors (None without media)."""

    input_ids: list[int]
    # The vision path (media/): resized uint8 frames, patched and normalised when collated.
    images: tuple[Pixels, ...] = ()
    videos: tuple[Video, ...] = ()
    # The processor's path (where the vision path is off, or asked for with fast=False).
    pixel_values: Any = None
    image_grid_thw: Any = None
    pixel_values_videos: Any = None
    video_grid_thw: Any = None

    @property
    def has_media(self) -> bool:
        return bool(self.images or self.videos) or self.image_grid_thw is not None or self.video_grid_thw is not None

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def sample_frames(frames: tuple, max_segments: int) -> list:
    """Official frame sampling: at most `max_segments` frames, evenly spaced, indices as ints."""
    if len(frames) <= max_segments:
        return list(frames)
    return [frames[i] for i in np.linspace(0, len(frames) - 1, max_segments, dtype=int).tolist()]


def image_tokens(width: int, height: int, where: str) -> int:
    """The tokens an image becomes (its patches after the official resize, merged 2x2, plus the
    vision start and end tokens), from its size alone."""
    from qwen_vl_utils import smart_resize

    try:
        h, w = smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    except (ValueError, ZeroDivisionError) as exc:
        raise input_error(f"{where}: {str(exc)[:160] or 'an empty image'}") from None
    return (h // IMAGE_FACTOR) * (w // IMAGE_FACTOR) + 2


def _probe_png(seed: int, size: tuple[int, int]) -> bytes:
    """A small image with structure in every channel (no two neighbours alike)."""
    from PIL import Image

    width, height = size
    ramp = np.arange(width * height * 3, dtype=np.int64).reshape(height, width, 3)
    buf = io.BytesIO()
    Image.fromarray(((ramp * (seed * 2 + 7)) % 251).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _probe_item(where: str, image: bool = False, video: bool = False) -> InputItem:
    """An input for checking the vision path: an image that the official resize makes larger,
    and three video frames (an odd count, so padded), with text."""
    images = (MediaSource("bytes", _probe_png(1, (70, 50)), f"{where}.image[0]"),) if image else ()
    frames = tuple(MediaSource("bytes", _probe_png(k, (60, 40)), f"{where}.video[0].frames[{k}]") for k in range(3))
    videos = (VideoSource(f"{where}.video[0]", frames=frames),) if video else ()
    return InputItem(where, texts=("a probe",), images=images, videos=videos)


def normalize_embedding_instruction(instruction: str | None) -> str:
    """Stripped, with '.' appended unless it already ends in Unicode punctuation; default if empty."""
    if instruction:
        instruction = instruction.strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction += "."
    return instruction or EMBED_DEFAULT_INSTRUCTION


def _mm_token_types(processor) -> list[tuple[int, list[int]]] | None:
    """(type, token ids) for the model's `mm_token_type_ids` (1 image, 2 video, 3 audio), as the
    processor's `create_mm_token_type_ids` assigns them; None where the processor has none (older
    transformers computes the multimodal rope from the ids alone)."""
    if not hasattr(processor, "create_mm_token_type_ids"):
        return None
    kinds = ((1, "image_token_ids"), (2, "video_token_ids"), (3, "audio_token_ids"))
    return [(value, [t for t in (getattr(processor, name, None) or ()) if t is not None]) for value, name in kinds]


class _QwenVL:
    """What the embedding model and the reranker share: loading, media, processor, collation."""

    padding_side = "right"
    unused_weights: tuple[str, ...] = ()  # name prefixes of checkpoint tensors the model has no place for

    def __init__(self, settings: ModelSettings, media: MediaReader, model_cls, files: Path | None = None,
                 found=None, weights_cache=None, weights: WeightsRead | None = None):
        """`files`: the directory to load from (the one that was fingerprinted; default: settings.name's),
        `found`: its Fingerprint, whose weight files must not have changed since; `weights_cache`
        (weights_cache.py): where a quantized model is kept as converted (needs `found`); `weights`:
        its files' read, begun by the start (`read_weights`)."""
        import torch

        directory = Path(files) if files is not None else _directory_of(settings)
        self.settings = settings
        self.name = settings.name
        self.media = media
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.weights_format = _checked_format(settings, self.device)
        use_torchcodec_only()
        loaded = self._load_weights(model_cls, directory, found, weights_cache, weights)
        self.full_model, self.load_info, self.loaded = loaded.model, loaded.info, loaded
        self.full_model.eval()
        self.model = self.full_model.model
        self.config = self.full_model.config
        self.max_length = settings.max_length
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.pad_id = self.tokenizer.pad_token_id
        self.suffix_len = self._template_suffix_len()
        self._mm_token_types = _mm_token_types(self.processor)
        self._torch = torch
        # The video processor's default (no per-frame cap), named so that it does not warn each start.
        self._video_options = ({"cap_pixels_per_frame": False} if hasattr(
            getattr(self.processor, "video_processor", None), "cap_pixels_per_frame") else {})
        self.layout = PatchLayout.of(self.processor)
        # The image processor's own conversion of one resized image to a uint8 RGB tensor: how an
        # image with transparency becomes RGB differs between transformers versions.
        self._image_tensor = self.processor.image_processor.process_image
        self._convert_rgb = self.processor.image_processor.do_convert_rgb
        # What an image's prepared pixels depend on besides its bytes: models whose processors
        # agree share the image cache's entries, others never see each other's.
        self._pixel_recipe = hashlib.sha256(repr((
            MIN_PIXELS, MAX_PIXELS, IMAGE_FACTOR, type(self.processor.image_processor).__qualname__,
            self._convert_rgb, self.layout)).encode()).digest()[:8]
        self.vision_tokens = attempt(VisionTokens.of, self.processor)
        self.pixel_writer = None if self.layout is None else PixelWriter(self.layout, self.device, self.dtype)
        self.vision = False  # the vision path, once `_enable_vision_path` has checked it
        # Each forward in progress's pause callback (None: not paused), inner last: more than one
        # while a paused forward runs another.
        self._between_layers: list = []
        self._launched: collections.deque = collections.deque()
        self._hook_layers()

    @classmethod
    def read_weights(cls, settings: ModelSettings, directory: Path, found=None,
                     hash_unknown: bool = False) -> WeightsRead:
        """Start reading the model's weight files as a load of `settings` takes them: unquantized,
        in the compute dtype onto the device; quantized, in the file's own dtype on the CPU (to be
        converted). `hash_unknown`: hash the files `found` has no digest for as they pass."""
        dtype, device = cls._read_as(settings)
        return WeightsRead(directory, dtype, device, found, hash_unknown, cls.unused_weights)

    @staticmethod
    def _read_as(settings: ModelSettings) -> tuple:
        import torch

        device = resolve_device(settings.device)
        if parse_format(settings.quantize) != NONE:
            return "auto", torch.device("cpu")
        return resolve_dtype(settings.dtype, device), device

    def _load_weights(self, model_cls, directory: Path, found, cache, weights: WeightsRead | None) -> Loaded:
        """The model, its weights read while the processor loads (self.processor is set here), or
        taken from `weights` (a read the start began). Quantized: from the weights cache when it
        holds this model as converted; else converted layer by layer (weights.py) after the read,
        and written to the cache behind the load."""
        settings, fmt = self.settings, self.weights_format
        self._to_keep = None
        key = None if fmt in (NONE, FP8) or cache is None or found is None else cache.key(
            found.value, f"{model_cls.__name__}:{settings.name}", fmt, self.dtype, self.device)
        cached = weights is None and key is not None and cache.has(key)
        if cached:
            pending = Background(lambda: cache.load(key, model_cls, settings, directory, self.dtype, self.device))
        elif weights is None:
            weights = self.read_weights(settings, directory, found)
        self.processor = _load_processor(settings, str(directory), self.padding_side)
        self.tokenizer = self.processor.tokenizer
        if cached:
            loaded = pending.take()
            if loaded is not None:
                log.info("%s: %s weights from the weights cache", settings.name, fmt)
                return loaded
            weights = self.read_weights(settings, directory, found)
        dtype, device = self._read_as(settings)
        loaded = from_files(model_cls, settings, directory, dtype, device, weights)
        if fmt != NONE:
            converted = convert(loaded.model, fmt, self.device, self.dtype)
            log.info("%s: %d linear layers (%.2f billion weights) in %s", settings.name, converted.layers,
                     converted.weights / 1e9, fmt)
            if key is not None:  # written once the caller has checked the files unchanged (keep_converted)
                self._to_keep = (cache, key, cache.snapshot(loaded.model))
        return loaded

    def keep_converted(self):
        """Write this model as converted to the weights cache, in the background: called once its
        files are known to be those fingerprinted (an entry is served under that fingerprint).
        Returns the writing thread, or None when there is nothing to write."""
        pending, self._to_keep = self._to_keep, None
        if pending is None:
            return None
        cache, key, snapshot = pending
        return cache.save_later(key, snapshot)

    def _hook_layers(self) -> None:
        """A pre-forward hook on each decoder layer of the vision tower and the language model: where
        a running forward may be paused (engine.py's preemption). It changes no tensor."""
        layers = [*getattr(getattr(self.model, "visual", None), "blocks", ()),
                  *getattr(getattr(self.model, "language_model", None), "layers", ())]
        for layer in layers:
            layer.register_forward_pre_hook(self._before_layer)

    def _before_layer(self, _module, _args) -> None:
        pause = self._between_layers[-1] if self._between_layers else None
        if pause is None:
            return
        if self.device.type == "cuda":
            self._stay_near_the_device()
        pause()

    def _stay_near_the_device(self) -> None:
        """On CUDA the Python side launches a forward's layers far ahead of the device and then
        waits at the result's copy, so a pause there would come after all the device work was
        queued: a paused forward keeps its launches at most LAUNCH_AHEAD_LAYERS layers ahead (an
        event per layer), so interactive work waits for about that many layers of it. Not measured
        on a GPU yet (BENCHMARKS.md)."""
        event = self._torch.cuda.Event()
        event.record()
        self._launched.append(event)
        if len(self._launched) > LAUNCH_AHEAD_LAYERS:
            self._launched.popleft().synchronize()

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    def _template_suffix_len(self) -> int:
        """Tokens the template puts after the last content item (`<|im_end|>\\n<|im_start|>assistant\\n`)."""
        marker = "\u2063qwen3vl-marker\u2063"
        rendered = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": marker}]}],
            add_generation_prompt=True, tokenize=False,
        )
        return len(self.tokenizer(rendered.split(marker)[-1], add_special_tokens=False)["input_ids"])

    def check_texts(self, item: InputItem, instruction: str | None) -> None:
        """Refuse texts that carry the vision placeholder tokens: the processor would find image
        tokens without images (the official code raises), and the forward would misalign."""
        fields = [(f"{item.where}.text[{i}]", text) for i, text in enumerate(item.texts)]
        if instruction is not None:
            fields.append((f"{item.where}.instruction" if item.instruction else "instruction", instruction))
        reserved = (self.processor.image_token, self.processor.video_token)
        for field, text in fields:
            for token in reserved:
                if token in text:
                    raise input_error(f"{field}: contains the reserved token {token}")
        # The template joins an input's texts: two may make a reserved token between them.
        keep, tail = max(map(len, reserved)) - 1, ""
        for i, text in enumerate(item.texts):
            window = tail + text[:keep]
            for token in reserved:
                if token in window:
                    raise input_error(f"{item.where}.text[{i}]: joined to the text before it, makes the reserved "
                                      f"token {token}")
            tail = (tail + text)[-keep:] if len(text) < keep else text[-keep:]

    # -- conversation content --------------------------------------------------------------------
    def open_images(self, items: tuple[InputItem, ...], budget: int, where: str) -> dict[int, Any]:
        """Every image of these inputs with only its header read, by id of its source, with its
        cache key. Their vision tokens are counted from the headers, and when they alone exceed
        `budget` the input is refused before any pixel is decoded."""
        opened: dict[int, Any] = {}
        tokens = 0
        try:
            for item in items:
                for src in item.images:
                    opened[id(src)] = image, _ = self.media.open_image_keyed(src)
                    tokens += image_tokens(*image.size, src.where)
            if tokens > budget:
                raise too_large(f"{where}: its images need {tokens} vision tokens, over the model's limit of "
                                f"{self.max_length} tokens ({self.limit_name}); send fewer or smaller images")
        except BaseException:
            for image, _ in opened.values():
                image.close()
            raise
        return opened

    def _image(self, src, opened: dict[int, Any]):
        """Decode one image and resize it at once, as the official pipeline's `fetch_image` does: only
        one image is held at full size at a time."""
        from qwen_vl_utils import fetch_image

        image, _ = opened.pop(id(src), None) or self.media.open_image_keyed(src)
        self.media.decode_image(image, src.where)
        try:
            return fetch_image({"image": image, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS},
                               image_patch_size=IMAGE_PATCH_SIZE)
        except ValueError as exc:
            raise input_error(f"{src.where}: {str(exc)[:160]}") from None
        finally:
            image.close()

    def _image_pixels(self, src: MediaSource, opened: dict[int, Any]) -> Pixels:
        """One image as the vision path keeps it: decoded, resized as `_image` resizes it, uint8;
        from the cache when the same bytes were prepared before."""
        image, key = opened.pop(id(src), None) or self.media.open_image_keyed(src)
        cache = self.media.image_cache
        key = None if key is None else self._pixel_recipe + key
        try:
            if key is not None and (hit := cache.get(key)) is not None:
                return hit
            self.media.decode_image(image, src.where)
            try:
                resized = resized_image(image, MIN_PIXELS, MAX_PIXELS, IMAGE_FACTOR)
            except ValueError as exc:
                raise input_error(f"{src.where}: {str(exc)[:160]}") from None
            pixels = self._rgb_pixels(resized)
            if key is not None:
                cache.put(key, pixels)
            return pixels
        finally:
            image.close()

    def _rgb_pixels(self, resized) -> Pixels:
        """The resized image's pixels as the image processor takes them in. An RGB image with no
        transparency key is its own pixels in every transformers version; any other goes through
        the processor's own conversion (versions differ on a transparency key)."""
        if resized.mode == "RGB" and "transparency" not in resized.info:
            return self.layout.image(self._torch.from_numpy(np.array(resized)), channels_last=True)
        return self.layout.image(self._image_tensor(resized, do_convert_rgb=self._convert_rgb))

    def _video_item(self, video: VideoSource, item: InputItem, stack: contextlib.ExitStack) -> dict:
        max_frames = item.max_frames or MAX_FRAMES
        if video.file is not None:
            path = stack.enter_context(self.media.video_file(video.file, max_frames))
            return {"type": "video", "video": path, "fps": item.fps or DEFAULT_FPS, "max_frames": max_frames}
        sampled = sample_frames(video.frames, MAX_FRAMES)
        frames = [self.media.open_image(f) for f in sampled]  # headers only
        self.media.check_video_pixels(sum(f.size[0] * f.size[1] for f in frames), f"{len(frames)} frames",
                                      video.where)
        frames = [self.media.decode_image(img, f.where) for img, f in zip(frames, sampled)]
        return {"type": "video", "video": frames, "total_pixels": MAX_TOTAL_PIXELS}

    def _video(self, video: VideoSource, item: InputItem) -> Video:
        """One video as the vision path keeps it: its frames read and resized as qwen_vl_utils'
        fetch_video does it, kept as uint8 (media/video.py)."""
        with contextlib.ExitStack() as stack:
            ele = self._video_item(video, item, stack)
            with _reading_media(video.where):
                pixels, metadata = read_video(ele, IMAGE_PATCH_SIZE, self.layout)
        return self.vision_tokens.video(pixels, metadata)

    def _media_content(self, item: InputItem, stack: contextlib.ExitStack, opened: dict[int, Any]) -> list[dict]:
        """Videos first, then images, then texts; the single text NULL when the input is empty."""
        if not item.texts and not item.images and not item.videos:
            return [{"type": "text", "text": "NULL"}]
        content = [self._video_item(v, item, stack) for v in item.videos]
        content += [{"type": "image", "image": self._image(img, opened), "min_pixels": MIN_PIXELS,
                     "max_pixels": MAX_PIXELS} for img in item.images]
        content += [{"type": "text", "text": t} for t in item.texts]
        return content

    def _rendered(self, item: InputItem) -> str:
        """What the chat template renders for `_media_content`: each video's and image's vision
        item (a single pad), then the texts; NULL for an empty input."""
        if item.is_text_only:
            return "".join(item.texts) if item.texts else "NULL"
        return (self.vision_tokens.video_item * len(item.videos) + self.vision_tokens.image_item * len(item.images)
                + "".join(item.texts))

    def _media(self, work: tuple) -> tuple[tuple[Pixels, ...], tuple[Video, ...]]:
        """The images and videos of a piece of work, prepared by the vision path, in the order the
        template renders their pads (each input's videos, then its images)."""
        items, budget, where = self._media_of(*work)
        opened = self.open_images(items, budget, where)
        images, videos = [], []
        try:
            for item in items:
                videos += [self._video(v, item) for v in item.videos]
                images += [self._image_pixels(src, opened) for src in item.images]
        finally:
            for image, _ in opened.values():
                image.close()
        return tuple(images), tuple(videos)

    # -- processor ------------------------------------------------------------------------------
    def _process(self, conversation: list[dict], where: str) -> Features:
        from qwen_vl_utils import process_vision_info

        text = self.processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=False)
        # Images were fetched (resized) by `_image`, once, as the official code fetches them; a
        # second fetch would check the aspect ratio of the resized image again (6600x33 becomes
        # 6592x32: over the ratio the original is within). Only the videos go through here.
        images = [c["image"] for turn in conversation for c in turn["content"] if c.get("type") == "image"] or None
        videos_only = [{**turn, "content": [c for c in turn["content"] if c.get("type") != "image"]}
                       for turn in conversation]
        with _reading_media(where):
            _, videos, video_kwargs = process_vision_info(
                [videos_only], image_patch_size=IMAGE_PATCH_SIZE,
                return_video_kwargs=True, return_video_metadata=True,
            )
        metadata = None
        if videos is not None:
            videos, metadata = (list(x) for x in zip(*videos))
        try:
            out = self.processor(
                text=text, images=images, videos=videos, video_metadata=metadata,
                truncation=False, padding=False, do_resize=False, return_tensors="pt", **video_kwargs,
                **self._video_options,
            )
        except ValueError as exc:
            raise input_error(f"{where}: the processor refused the input ({str(exc)[:160]})") from None
        return Features(
            input_ids=out["input_ids"][0].tolist(),
            pixel_values=out.get("pixel_values"),
            image_grid_thw=out.get("image_grid_thw"),
            pixel_values_videos=out.get("pixel_values_videos"),
            video_grid_thw=out.get("video_grid_thw"),
        )

    def _keep_special_and_first(self, ids: list[int], budget: int, where: str) -> list[int]:
        """Official truncation: keep every special token and the first non-special ones that fit."""
        if len(ids) <= budget:
            return ids
        specials = sum(1 for t in ids if t in self.special_ids)
        if specials > budget:
            raise too_large(f"{where}: the input's vision and special tokens alone ({specials}) exceed the "
                            f"model's limit of {self.max_length} tokens; send fewer or smaller images/frames")
        keep = budget - specials
        out = []
        for t in ids:
            if t in self.special_ids:
                out.append(t)
            elif keep > 0:
                out.append(t)
                keep -= 1
        return out

    # -- preparing -------------------------------------------------------------------------------
    # A subclass's work is the tuple of its `prepare` arguments. It says where the work is named in
    # errors (`_where`), which inputs hold its media and their token budget (`_media_of`), gives its
    # checked (user, system) texts for the fast path, or None when it has media and the vision
    # path is off (`_fast_texts`), prepares it through the processor (`_prepare_slow`), and applies
    # the official truncation (`_fit`).
    def _prepare(self, work: tuple, fast: bool) -> Features:
        if not (fast and self.fast is not None):
            return self._prepare_slow(*work)
        result = self.prepare_many([work])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def prepare_many(self, works: list[tuple]) -> list[Features | Exception]:
        """`prepare` of each work, or the exception it raised; the texts (and, on the vision path,
        the template text around each input's media) are tokenised together, in one call."""
        out: list = [None] * len(works)
        texts: list[tuple[int, str, str | None, tuple]] = []  # (position, user text, system text, media)
        for i, work in enumerate(works):
            found = attempt(self._fast_texts, *work) if self.fast is not None else None
            if isinstance(found, Exception):
                out[i] = found
            elif found is None:
                out[i] = attempt(self._prepare_slow, *work)
            elif isinstance(media := attempt(self._media, work) if self._has_media(work) else NO_MEDIA, Exception):
                out[i] = media
            else:
                texts.append((i, *found, media))
        if texts:
            rows = self.fast.ids_many([t[1] for t in texts], [t[2] for t in texts])
            for (i, _, _, (images, videos)), ids in zip(texts, rows):
                out[i] = attempt(self._features, ids, images, videos, self._where(*works[i]))
        return out

    @staticmethod
    def _has_media(work: tuple) -> bool:
        return any(isinstance(part, InputItem) and not part.is_text_only for part in work)

    def _features(self, ids: list[int], images: tuple, videos: tuple, where: str) -> Features:
        vision = self.vision_tokens
        if isinstance(vision, VisionTokens) and (ids.count(vision.image_pad) != len(images)
                                                 or ids.count(vision.video_pad) != len(videos)):
            # check_texts refuses what makes one; this keeps any other way from failing a whole batch.
            raise input_error(f"{where}: its texts make vision tokens that no image or video of it fills")
        if images or videos:
            ids = vision.expand(ids, list(images), list(videos))
        return self._fit(Features(ids, images, videos), where)

    def _enable_vision_path(self) -> None:
        """Take the vision path where it gives what the processor gives on this model's probe (an
        image resized up, three video frames, text): the same ids and, bit for bit, the same
        pixels; else keep the processor's path, saying so."""
        self.vision = (self.layout is not None and self.fast is not None
                       and not isinstance(self.vision_tokens, Exception))
        if not self.vision:
            return
        # The probe is the code's check, not a client's input: read under the default policy,
        # past the image cache, with room for its tokens whatever the model's limit.
        served, self.media = (self.media, self.max_length), MediaReader(MediaPolicy())
        self.max_length = max(self.max_length, PROBE_MAX_LENGTH)
        try:
            probe = self._vision_probe()
            theirs = attempt(self._prepare_slow, *probe)
            ours = self.prepare_many([probe])[0]
        finally:
            self.media, self.max_length = served
        if isinstance(theirs, Exception) or isinstance(ours, Exception) or not self._same_features(ours, theirs):
            problem = next((f"{type(e).__name__}: {str(e)[:160]}" for e in (theirs, ours) if isinstance(e, Exception)),
                           "it differs from the processor on the probe")
            log.warning("%s: vision fast path disabled (%s)", self.name, problem)
            self.vision = False

    def _same_features(self, ours: Features, theirs: Features) -> bool:
        torch, cpu = self._torch, self._torch.device("cpu")
        pairs = [(self.layout.written(list(ours.images), cpu), theirs.pixel_values),
                 (self.layout.written([v.pixels for v in ours.videos], cpu), theirs.pixel_values_videos),
                 (torch.tensor([p.grid for p in ours.images]), theirs.image_grid_thw),
                 (torch.tensor([v.pixels.grid for v in ours.videos]), theirs.video_grid_thw)]
        return ours.input_ids == theirs.input_ids and all(same_pixels(a, b) for a, b in pairs)

    # -- forward ---------------------------------------------------------------------------------
    def _collate(self, batch: list[Features]) -> dict:
        """The batch's tensors on the model's device: ids and mask built by one vectorised copy each,
        padded on `padding_side`; on CUDA copied from pinned memory without waiting (the forward's
        final result copy is the only point where the host waits for the device)."""
        lengths = np.fromiter((f.tokens for f in batch), dtype=np.int64, count=len(batch))
        width = int(lengths.max())
        columns = np.arange(width)
        if self.padding_side == "right":
            mask = columns < lengths[:, None]
        else:
            mask = columns >= (width - lengths)[:, None]
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        # Row-major boolean assignment fills each row's unpadded span in order.
        ids[mask] = np.fromiter(itertools.chain.from_iterable(f.input_ids for f in batch), dtype=np.int64,
                                count=int(lengths.sum()))
        host = {"input_ids": ids, "attention_mask": mask.astype(np.int64)}
        if self._mm_token_types is not None and any(f.has_media for f in batch):
            types = np.zeros_like(ids)
            for value, token_ids in self._mm_token_types:
                types[np.isin(ids, token_ids)] = value
            host["mm_token_type_ids"] = types
        out = {key: self._to_device(self._torch.from_numpy(value)) for key, value in host.items()}
        images = [p for f in batch for p in f.images]
        videos = [v.pixels for f in batch for v in f.videos]
        if images or videos:  # written into one buffer
            # A forward run inside a paused one must not write into the buffer the paused one may read.
            (pixels, grid), (video_pixels, video_grid) = self.pixel_writer.write(images, videos,
                                                                               reuse=len(self._between_layers) <= 1)
            if images:
                out["pixel_values"], out["image_grid_thw"] = pixels, grid
            if videos:
                out["pixel_values_videos"], out["video_grid_thw"] = video_pixels, video_grid
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [getattr(f, key) for f in batch if getattr(f, key) is not None]
            if parts and (images or videos):
                raise RuntimeError("a batch mixes inputs of the vision and the processor's paths")
            if parts:
                out[key] = self._to_device(self._cat(parts))
        out["lengths"] = lengths
        return out

    def _cat(self, parts: list):
        """One tensor of the parts, written straight into pinned memory when bound for CUDA."""
        torch = self._torch
        if self.device.type != "cuda":
            return torch.cat(parts, dim=0)
        rows = sum(int(p.shape[0]) for p in parts)
        out = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
        return torch.cat(parts, dim=0, out=out)

    def _to_device(self, value):
        if self.device.type == "cuda":
            if not value.is_pinned():
                value = value.pin_memory()
            value = value.to(self.device, non_blocking=True)
        else:
            value = value.to(self.device)
        return value.to(self.dtype) if value.is_floating_point() else value

    def _last_hidden(self, batch: list[Features], between_layers=None):
        """The last hidden states of a batch, and its lengths; `between_layers` (if any) is called
        before each decoder layer of this forward, and not of the forwards it runs meanwhile."""
        torch = self._torch
        self._between_layers.append(between_layers)
        if between_layers is not None:
            self._launched = collections.deque()  # the CUDA events of this forward's layers (_stay_near_the_device)
        try:
            inputs = self._collate(batch)
            lengths = inputs.pop("lengths")
            with torch.inference_mode():
                hidden = self.model(**inputs).last_hidden_state
        finally:
            self._between_layers.pop()
        return hidden, lengths

    def warmup(self) -> None:
        """The shortest forward that initialises the kernels and the allocator (two tokens, no
        template), so that the first client does not pay for lazy initialisation."""
        self._last_hidden([Features(self.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))])


class EmbeddingModel(_QwenVL):
    padding_side = "right"
    unused_weights = ("lm_head.",)  # a checkpoint's LM head: the embedding model has none
    limit_name = "embedding_max_length"

    def __init__(self, settings: ModelSettings, media: MediaReader, files: Path | None = None, found=None,
                 weights_cache=None, weights: WeightsRead | None = None):
        super().__init__(settings, media, _embedding_class(), files, found, weights_cache, weights)
        self.fast = build_fast_path(self.processor, None, lambda system, user: self._process(
            [{"role": "system", "content": [{"type": "text", "text": system}]},
             {"role": "user", "content": [{"type": "text", "text": user}]}], "probe").input_ids)
        self._enable_vision_path()

    def conversation(self, item: InputItem, instruction: str | None, stack: contextlib.ExitStack,
                     opened: dict[int, Any] | None = None) -> list[dict]:
        return [
            {"role": "system", "content": [{"type": "text", "text": normalize_embedding_instruction(instruction)}]},
            {"role": "user", "content": self._media_content(item, stack, {} if opened is None else opened)},
        ]

    def prepare(self, item: InputItem, instruction: str | None = None, fast: bool = True) -> Features:
        """Tokens and pixels for one input. The input's own instruction wins over the request's.
        Text-only inputs take the fast path (bit-identical ids) unless fast=False."""
        return self._prepare((item, instruction), fast)

    def _where(self, item: InputItem, instruction: str | None) -> str:
        return item.where

    def _media_of(self, item: InputItem, instruction: str | None) -> tuple[tuple[InputItem, ...], int, str]:
        return (item,), self.max_length - self.suffix_len, item.where

    def _vision_probe(self) -> tuple:
        return (_probe_item("probe", image=True, video=True), "probe")

    def _fast_texts(self, item: InputItem, instruction: str | None) -> tuple[str, str] | None:
        if not (item.is_text_only or self.vision):
            return None
        instruction = item.instruction or instruction
        self.check_texts(item, instruction)
        return self._rendered(item), normalize_embedding_instruction(instruction)

    def _prepare_slow(self, item: InputItem, instruction: str | None) -> Features:
        instruction = item.instruction or instruction
        self.check_texts(item, instruction)
        opened = self.open_images(*self._media_of(item, instruction))
        with contextlib.ExitStack() as stack:
            features = self._process(self.conversation(item, instruction, stack, opened), item.where)
        return self._fit(features, item.where)

    def _fit(self, features: Features, where: str) -> Features:
        ids = features.input_ids
        if len(ids) > self.max_length:
            # Cut text only: keep every special and vision token and the template's ending, so that
            # the pooled position is always the template's last token.
            head, tail = ids[: -self.suffix_len], ids[-self.suffix_len:]
            features.input_ids = self._keep_special_and_first(head, self.max_length - self.suffix_len, where) + tail
        return features

    def embed(self, batch: list[Features], between_layers=None):
        """Raw (not normalised) float32 embeddings, one row per input: the last hidden state at the
        last position whose attention mask is 1."""
        torch = self._torch
        hidden, lengths = self._last_hidden(batch, between_layers)
        # Right padding: the last position whose attention mask is 1 is each row's length - 1.
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = self._to_device(torch.from_numpy(lengths - 1))  # pinned and non-blocking on CUDA
        return hidden[rows, last].float().cpu()


class RerankerModel(_QwenVL):
    padding_side = "left"
    limit_name = "reranker_max_length"

    def __init__(self, settings: ModelSettings, media: MediaReader, files: Path | None = None, found=None,
                 weights_cache=None, weights: WeightsRead | None = None):
        from transformers import Qwen3VLForConditionalGeneration

        super().__init__(settings, media, Qwen3VLForConditionalGeneration, files, found, weights_cache, weights)
        vocab = self.tokenizer.get_vocab()
        if "yes" not in vocab or "no" not in vocab:
            raise ModelLoadError(f"the tokenizer of {settings.name!r} has no single 'yes'/'no' tokens")
        weight = self.full_model.lm_head.weight.data
        # Computed in the model's dtype, as the official score head is.
        self.score_vector = (weight[vocab["yes"]] - weight[vocab["no"]]).detach().clone()
        # Only the base model runs from here on; drop the LM head (and its memory) unless it is the
        # embedding table itself (tied, and the table not replaced by its int8 form: weights.py).
        table = getattr(self.model.get_input_embeddings(), "weight", None)
        if table is None or self.full_model.lm_head.weight.data_ptr() != table.data_ptr():
            del self.full_model.lm_head
        self.fast = build_fast_path(self.processor, RERANK_SYSTEM_PROMPT, lambda system, user: self._process(
            [{"role": "system", "content": [{"type": "text", "text": system}]},
             {"role": "user", "content": [{"type": "text", "text": user}]}], "probe").input_ids)
        self._enable_vision_path()

    def conversation(self, query: InputItem, document: InputItem, instruction: str | None,
                     stack: contextlib.ExitStack, opened: dict[int, Any] | None = None) -> list[dict]:
        opened = {} if opened is None else opened
        content = [{"type": "text", "text": "<Instruct>: " + (instruction or RERANK_DEFAULT_INSTRUCTION)},
                   {"type": "text", "text": "<Query>:"}]
        content += self._media_content(query, stack, opened)
        content.append({"type": "text", "text": "\n<Document>:"})
        content += self._media_content(document, stack, opened)
        return [{"role": "system", "content": [{"type": "text", "text": RERANK_SYSTEM_PROMPT}]},
                {"role": "user", "content": content}]

    def prepare(self, query: InputItem, document: InputItem, instruction: str | None = None,
                fast: bool = True) -> Features:
        return self._prepare((query, document, instruction), fast)

    def _where(self, query: InputItem, document: InputItem, instruction: str | None) -> str:
        return document.where

    def _media_of(self, query: InputItem, document: InputItem,
                  instruction: str | None) -> tuple[tuple[InputItem, ...], int, str]:
        return (query, document), self.max_length, document.where

    def _vision_probe(self) -> tuple:
        return (_probe_item("query", video=True), _probe_item("document", image=True), None)

    def _fast_texts(self, query: InputItem, document: InputItem, instruction: str | None) -> tuple[str, None] | None:
        if not ((query.is_text_only and document.is_text_only) or self.vision):
            return None
        instruction = query.instruction or instruction
        self.check_texts(query, instruction)
        self.check_texts(document, None)
        # The user turn's items render as one concatenated string.
        return ("<Instruct>: " + (instruction or RERANK_DEFAULT_INSTRUCTION) + "<Query>:"
                + self._rendered(query) + "\n<Document>:" + self._rendered(document)), None

    def _prepare_slow(self, query: InputItem, document: InputItem, instruction: str | None) -> Features:
        instruction = query.instruction or instruction
        self.check_texts(query, instruction)
        self.check_texts(document, None)
        opened = self.open_images(*self._media_of(query, document, instruction))
        with contextlib.ExitStack() as stack:
            conversation = self.conversation(query, document, instruction, stack, opened)
            features = self._process(conversation, document.where)
        return self._fit(features, document.where)

    def _fit(self, features: Features, where: str) -> Features:
        # Official truncation: everything before the last `suffix_len` tokens is cut to max_length
        # (keeping special tokens), then the template's ending is appended.
        ids = features.input_ids
        head, tail = ids[: -self.suffix_len], ids[-self.suffix_len:]
        features.input_ids = self._keep_special_and_first(head, self.max_length, where) + tail
        return features

    def score(self, batch: list[Features], between_layers=None):
        """sigmoid(h · (W[yes] − W[no])) with h the last hidden state at the final position."""
        torch = self._torch
        hidden, _ = self._last_hidden(batch, between_layers)
        logits = hidden[:, -1] @ self.score_vector.to(hidden.device)
        return torch.sigmoid(logits.float()).cpu().numpy()


def cut_and_normalize(raw: np.ndarray, dimension: int, normalize: bool) -> np.ndarray:
    """Matryoshka: keep the first `dimension` components, then L2-normalise (if asked), as
    torch.nn.functional.normalize does: x / max(||x||, 1e-12)."""
    out = np.asarray(raw, dtype=np.float32)[:, :dimension]
    if not normalize:
        return np.ascontiguousarray(out)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out, dtype=np.float32))[:, None]
    return out / np.maximum(norms, np.float32(1e-12))
