"""Wire inputs parsed into typed items: pure validation, no media read and no model touched, so the
daemon's socket loop runs it on every request at once (PROTOCOL.md, "Inputs")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import invalid, too_large
from .limits import Limits


class FrameLimit(Protocol):
    """What parsing needs of the daemon's media policy: how many frames a frame list may hold."""

    max_video_frames: int


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


def parse_input(value: Any, where: str, limits: Limits, media: FrameLimit) -> InputItem:
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
