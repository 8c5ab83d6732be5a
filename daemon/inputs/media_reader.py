"""The media of parsed inputs (qwen3vl_client.inputs), read under the operator's policy on the model
side: images, frames and video files, by bytes, allowed path or URL."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from daemon.bounded import BoundedCache
from daemon.config import MediaPolicy
from daemon.inputs.files import AllowedFiles
from daemon.inputs.urls import UrlFetcher
from qwen3vl_client.errors import input_error, too_large
from qwen3vl_client.inputs import MAX_SAMPLED_FRAMES, MediaSource


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
