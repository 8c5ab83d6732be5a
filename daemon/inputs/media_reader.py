"""Wire inputs: parse them into typed items (cheap, on the socket thread) and read their media
(images, frames, video files) under the operator's policy (on the model side)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from daemon.bounded import BoundedCache
from daemon.config import Limits, MediaPolicy
from daemon.errors import input_error, invalid, too_large
from daemon.inputs.files import AllowedFiles
from daemon.inputs.urls import UrlFetcher

INPUT_KEYS = frozenset({"text", "image", "video", "instruction", "fps", "max_frames"})
MAX_SAMPLED_FRAMES = 768  # the most frames a client may ask to sample from a video file (max_frames)


@dataclass(frozen=True)
class MediaSource:
    """Encoded bytes, an operator-allowed path, or a URL; `where` names it in errors."""

    kind: str  # "bytes" | "path" | "url"
    value: Any
    where: str


@dataclass(frozen=True)
class VideoSource:
    """Either a list of frames (images) or one video file."""

    where: str
    frames: tuple[MediaSource, ...] = ()
    file: MediaSource | None = None


@dataclass(frozen=True)
class InputItem:
    """One input: texts, images and videos (all optional), with its own instruction and video settings."""

    where: str
    texts: tuple[str, ...] = ()
    images: tuple[MediaSource, ...] = ()
    videos: tuple[VideoSource, ...] = ()
    instruction: str | None = None
    fps: float | None = None
    max_frames: int | None = None

    @property
    def is_text_only(self) -> bool:
        return not self.images and not self.videos


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _parse_media(value: Any, where: str) -> MediaSource:
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise invalid(f"{where}: empty image bytes")
        return MediaSource("bytes", bytes(value), where)
    if isinstance(value, dict) and len(value) == 1:
        (key, ref), = value.items()
        if key in ("path", "url") and isinstance(ref, str) and ref:
            return MediaSource(key, ref, where)
        if key == "data" and isinstance(ref, (bytes, bytearray, memoryview)) and len(ref):
            return MediaSource("bytes", bytes(ref), where)
    raise invalid(f"{where}: expected encoded bytes (msgpack bin), {{\"data\": bin}}, {{\"path\": str}} "
                  "or {\"url\": str}")


def _parse_video(value: Any, where: str, limits_frames: int) -> VideoSource:
    if isinstance(value, (dict, bytes, bytearray, memoryview)):  # one encoded video file
        return VideoSource(where, file=_parse_media(value, where))
    if isinstance(value, list):
        if not value:
            raise invalid(f"{where}: a video needs at least one frame")
        if len(value) > limits_frames:
            raise too_large(f"{where}: {len(value)} frames exceed the limit of {limits_frames} (max_video_frames)")
        return VideoSource(where, frames=tuple(_parse_media(f, f"{where}.frames[{i}]") for i, f in enumerate(value)))
    raise invalid(f"{where}: expected a list of frames, video file bytes, or {{\"path\"}}/{{\"url\"}}")


def _parse_videos(value: Any, where: str, max_frames: int) -> tuple[VideoSource, ...]:
    # A map is one video file. A list of bytes is one video given as frames. A list whose items are
    # lists or maps is a list of videos (frame lists or files): see PROTOCOL.md.
    if isinstance(value, list) and value and all(isinstance(v, (list, dict)) for v in value):
        return tuple(_parse_video(v, f"{where}[{i}]", max_frames) for i, v in enumerate(value))
    return (_parse_video(value, f"{where}[0]", max_frames),)


def _number(value: Any, where: str, kind: type, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise invalid(f"{where}: expected {'an integer' if kind is int else 'a number'}")
    if not (math.isfinite(value) and low <= value <= high):
        raise invalid(f"{where}: must be between {low:g} and {high:g}")
    return kind(value)


def parse_instruction(value: Any, where: str, limits: Limits) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{where}: expected a string or nil")
    if len(value) > limits.max_text_chars:
        raise too_large(f"{where}: {len(value)} characters exceed the limit of {limits.max_text_chars} "
                        "(max_text_chars)")
    return value


def parse_input(value: Any, where: str, limits: Limits, media: MediaPolicy) -> InputItem:
    """Validate one wire input; no media is read here."""
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        raise invalid(f"{where}: expected a string or a map")
    unknown = sorted(str(k) for k in value if k not in INPUT_KEYS)
    if unknown:
        raise invalid(f"{where}: unknown field(s) {', '.join(unknown)}")
    texts = tuple(_as_list(value["text"])) if value.get("text") is not None else ()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise invalid(f"{where}.text[{i}]: expected a string")
        if len(text) > limits.max_text_chars:
            raise too_large(f"{where}.text[{i}]: {len(text)} characters exceed the limit of "
                            f"{limits.max_text_chars} (max_text_chars)")
    images = ()
    if value.get("image") is not None:
        images = tuple(_parse_media(v, f"{where}.image[{i}]") for i, v in enumerate(_as_list(value["image"])))
    videos = ()
    if value.get("video") is not None:
        videos = _parse_videos(value["video"], f"{where}.video", media.max_video_frames)
    fps = value.get("fps")
    max_frames = value.get("max_frames")
    return InputItem(
        where=where,
        texts=texts,
        images=images,
        videos=videos,
        instruction=parse_instruction(value.get("instruction"), f"{where}.instruction", limits),
        fps=None if fps is None else _number(fps, f"{where}.fps", float, 0.01, 60.0),
        max_frames=None if max_frames is None else _number(max_frames, f"{where}.max_frames", int, 2, MAX_SAMPLED_FRAMES),
    )


@dataclass
class MediaReader:
    """Reads media under a MediaPolicy. Every refusal names the field it came from."""

    policy: MediaPolicy
    image_cache: BoundedCache | None = None  # images' prepared pixels by content (models.py)
    files: AllowedFiles = field(init=False)
    urls: UrlFetcher = field(init=False)

    def __post_init__(self) -> None:
        self.files = AllowedFiles(self.policy.allowed_roots)
        self.urls = UrlFetcher(self.policy)

    def fetch_url(self, src: MediaSource, max_bytes: int, limit_name: str) -> bytes:
        return self.urls.fetch(src.value, src.where, max_bytes, limit_name)

    # -- images --------------------------------------------------------------------------------
    def image_bytes(self, src: MediaSource) -> bytes:
        if src.kind == "bytes":
            return src.value
        if src.kind == "path":
            return self.files.read(src.value, f"{src.where}.path", self.policy.max_image_bytes, "max_image_bytes")
        return self.fetch_url(src, self.policy.max_image_bytes, "max_image_bytes")

    def open_image(self, src: MediaSource):
        """An image with only its header read (no pixel decoded), its size within max_image_pixels.
        Its bytes are read once, here: `decode_image` decodes from them."""
        return self._opened(src)[0]

    def open_image_keyed(self, src: MediaSource) -> tuple[Any, bytes | None]:
        """`open_image`, and the key of its bytes in `image_cache` (None without a cache): what
        a client sends or the operator's files hold is keyed by what was read, never by a name."""
        img, data = self._opened(src)
        return img, None if self.image_cache is None else b"image:" + hashlib.sha256(data).digest()

    def _opened(self, src: MediaSource) -> tuple[Any, bytes]:
        from PIL import Image

        data = self.image_bytes(src)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # Pillow's own bound (twice its MAX_IMAGE_PIXELS), from the header
            raise too_large(f"{src.where}: the image's header declares more pixels than the limit of "
                            f"{self.policy.max_image_pixels} (max_image_pixels)") from None
        except Exception:
            raise input_error(f"{src.where}: not a decodable image") from None
        width, height = img.size
        if width * height > self.policy.max_image_pixels:
            raise too_large(f"{src.where}: {width}x{height} pixels exceed the limit of {self.policy.max_image_pixels} "
                            "(max_image_pixels)")
        return img, data

    @staticmethod
    def decode_image(img, where: str):
        try:
            img.load()
        except Exception:
            raise input_error(f"{where}: corrupt or truncated image") from None
        return img

    def check_video_pixels(self, pixels: int, frames: str, where: str) -> None:
        """A video's decoded frames (their pixels in all, from headers) within max_video_pixels."""
        if pixels > self.policy.max_video_pixels:
            raise too_large(f"{where}: {frames} of {pixels} pixels in all exceed the limit of "
                            f"{self.policy.max_video_pixels} decoded pixels per video (max_video_pixels)")

    # -- videos --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def video_file(self, src: MediaSource, max_frames: int = MAX_SAMPLED_FRAMES) -> Iterator[str]:
        """A name a decoder can open for a checked video file (duration and frame size within the
        policy): a client's path is opened once and named by its descriptor; downloads and inline
        bytes go to a private temp file, removed on exit."""
        if src.kind == "path":
            with self.files.opened(src.value, f"{src.where}.path", self.policy.max_video_bytes,
                                   "max_video_bytes") as path:
                self.check_video(path, src.where, max_frames)
                yield path
            return
        data = src.value if src.kind == "bytes" else self.fetch_url(src, self.policy.max_video_bytes, "max_video_bytes")
        fd, name = tempfile.mkstemp(prefix="qwen3vl-video-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.check_video(name, src.where, max_frames)
            yield name
        finally:
            os.unlink(name)

    def check_video(self, path: str, where: str, max_frames: int = MAX_SAMPLED_FRAMES) -> None:
        """Read the container's header only: refuse what cannot be decoded, a duration over
        max_video_seconds, frames over max_image_pixels, and more decoded pixels than
        max_video_pixels (the frames sampled: at most max_frames) before a single frame is decoded."""
        from torchcodec.decoders import VideoDecoder

        try:
            meta = VideoDecoder(path, seek_mode="approximate").metadata
        except Exception:
            raise input_error(f"{where}: not a decodable video") from None
        seconds = meta.duration_seconds or 0.0
        if seconds > self.policy.max_video_seconds:
            raise too_large(f"{where}: {seconds:.1f} s of video exceed the limit of "
                            f"{self.policy.max_video_seconds:g} s (max_video_seconds)")
        width, height = meta.width or 0, meta.height or 0
        if width * height > self.policy.max_image_pixels:
            raise too_large(f"{where}: {width}x{height} frames exceed the limit of {self.policy.max_image_pixels} "
                            "pixels (max_image_pixels)")
        frames = min(max_frames, meta.num_frames or max_frames)
        self.check_video_pixels(frames * width * height, f"{frames} frames of {width}x{height}", where)
