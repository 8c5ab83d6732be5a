"""A video's frames read and resized as qwen_vl_utils' `fetch_video` reads and resizes them, kept
as uint8.

`fetch_video` ends with `.float()` of the resized uint8 frames: 19 MB of float32 for eight 448x448
frames, made and then converted back here. This is its code path without that step: the same
reader for a file, the same `fetch_image` of each frame of a frame list (called in turn, not on a
pool of eight threads per video: the daemon's preparing threads are its parallelism), the same
padding to whole temporal groups, the same `smart_resize` of the whole video and torchvision's
bicubic resize of the same tensor layout, skipped where the size is already right (torchvision
returns the input then). A frame list that needs no resize stays as the frames decoded (channels
last). tests/test_vision.py checks ids and pixels against the processor's path.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from daemon.inputs.media.pixels import PatchLayout, Pixels


class VideoError(ValueError):
    """A video the official pipeline cannot read either; the message says why, for the client."""


def read_video(ele: dict, image_patch_size: int, layout: PatchLayout) -> tuple[Pixels, dict]:
    """(the video as Pixels, its metadata as fetch_video gives it) for a content item of the
    official conversation: {"video": path, ...} or {"video": [PIL images], ...}."""
    import torch
    from qwen_vl_utils import vision_process as vp

    factor = image_patch_size * vp.SPATIAL_MERGE_SIZE
    if isinstance(ele["video"], str):
        try:
            video, metadata, _ = vp.VIDEO_READER_BACKENDS[vp.get_video_reader_backend()](ele)
        except Exception as exc:  # fetch_video would fall back to a reader this torchvision lacks
            raise VideoError(f"the video's frames cannot be decoded ({_reason(exc)})") from None
        channels_last = False
    else:
        video, metadata = _frame_list(ele, factor)
        channels_last = True  # (F, H, W, 3) as decoded
    frames = video.permute(0, 3, 1, 2) if channels_last else video
    nframes, _, height, width = frames.shape
    h, w = _video_size(ele, nframes, height, width, factor)
    if (h, w) != (height, width):
        from torchvision import transforms
        from torchvision.transforms import InterpolationMode

        frames = transforms.functional.resize(frames.contiguous(), [h, w], interpolation=InterpolationMode.BICUBIC,
                                              antialias=True)
        video, channels_last = frames, False
    if video.dtype != torch.uint8:  # a reader that gave floats: kept as they are
        video = video.float()
    return Pixels(video.contiguous(), layout.grid(nframes, h, w), channels_last), metadata


def _reason(exc: Exception, limit: int = 160) -> str:
    """A reader's error for a client: its last line, without the library's source locations
    (torchcodec writes `function, /path/File.cpp:1510, message`), cut at a word."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    line = re.sub(r"^.*\.(?:cpp|cc|c|h|hpp|py):\d+,\s*", "", line)
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line or type(exc).__name__


def _frame_list(ele: dict, factor: int) -> tuple[Any, dict]:
    """fetch_video's frame-list branch up to its resize: (uint8 (F, H, W, 3), metadata)."""
    import torch
    from qwen_vl_utils import vision_process as vp

    info = {k: v for k, v in ele.items() if k not in ("type", "video")}
    images = [vp.fetch_image({"image": frame, **info}, factor) for frame in ele["video"]]
    sizes = sorted({image.size for image in images})
    if len(sizes) > 1:  # fetch_video's stack of them fails
        (w1, h1), (w2, h2) = sizes[0], sizes[-1]
        raise VideoError(f"its frames differ in size after the official resize ({w1}x{h1} and {w2}x{h2}): "
                         "send the frames of one video at one size")
    nframes = vp.ceil_by_factor(len(images), vp.FRAME_FACTOR)
    images += [images[-1]] * (nframes - len(images))
    sample_fps = ele.get("sample_fps", 2.0)
    video = torch.stack([torch.from_numpy(np.array(image)) for image in images])
    raw_fps = info.pop("raw_fps", sample_fps)
    metadata = dict(fps=raw_fps, frames_indices=list(range(len(video))),
                    total_num_frames=(nframes / sample_fps) * raw_fps)
    return video, metadata


def _video_size(ele: dict, nframes: int, height: int, width: int, factor: int) -> tuple[int, int]:
    """fetch_video's resized (height, width) of the whole video."""
    from qwen_vl_utils import vision_process as vp

    min_pixels = ele.get("min_pixels", vp.VIDEO_MIN_TOKEN_NUM * factor * factor)
    total_pixels = ele.get("total_pixels", vp.MODEL_SEQ_LEN * factor * factor * 0.9)
    max_pixels = max(min(vp.VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / nframes * vp.FRAME_FACTOR),
                     int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in ele and "resized_width" in ele:
        return vp.smart_resize(ele["resized_height"], ele["resized_width"], factor=factor)
    return vp.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
