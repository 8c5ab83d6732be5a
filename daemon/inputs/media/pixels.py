"""Images and videos as the official pipeline resizes them, kept as uint8 frames, and the patch
layout that makes the model's `pixel_values` of them exactly as the official processor does.

The official processor (transformers' Qwen2VL image / Qwen3VL video processors, torchvision
backend) turns each resized image into float32 `(x - mean') / std'` (mean' and std' the mean and std
over the rescale factor, as it fuses them), then cuts it into 16x16 patches in 2x2 merge groups,
each patch repeated over the two temporal slots: 4.8 MB of float32 for a 448x448 image, made on the
host and concatenated per batch. Here the prepared input keeps the resized uint8 frames (0.6 MB),
and `PatchLayout.write` does the same arithmetic, op for op, straight into the batch's tensor on the
model's device. Normalisation is elementwise per channel, so `PatchLayout.of` checks it for every
one of the 256 values of each channel and the layout on a probe image and video against the
processor itself, and gives no layout (the processor path stays) when anything differs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CPU_BLOCK_VALUES = 1 << 17  # float32 values (512 KiB) a block of patch rows is written in on the CPU


@dataclass(frozen=True)
class Pixels:
    """One image or video, resized: `data` uint8 (float32 only for a video whose resize gave
    non-integral values), contiguous, (F, 3, H, W) or, `channels_last`, (F, H, W, 3) as a decoder
    gives it (no transposing copy on the host); never written once made. `grid`: (t, h, w) in
    patches."""

    data: Any
    grid: tuple[int, int, int]
    channels_last: bool = False

    @property
    def frames(self):
        """(F, 3, H, W), a view of `data`."""
        return self.data.permute(0, 3, 1, 2) if self.channels_last else self.data

    @property
    def nbytes(self) -> int:
        return int(self.data.numel() * self.data.element_size())

    @property
    def patches(self) -> int:
        t, h, w = self.grid
        return t * h * w


def resized_image(image, min_pixels: int, max_pixels: int, factor: int):
    """The decoded image in RGB at qwen_vl_utils' size, resampled as its `fetch_image` does
    (its own `to_rgb`, `smart_resize` and PIL's default filter), skipping the copy `convert`
    makes of an image that is RGB already. ValueError for a size the official resize refuses."""
    from qwen_vl_utils.vision_process import smart_resize, to_rgb

    rgb = image if image.mode == "RGB" else to_rgb(image)
    width, height = rgb.size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return rgb if (w, h) == rgb.size else rgb.resize((w, h))


@dataclass(frozen=True)
class PatchLayout:
    """What the processor's pixel step is: patch, merge and temporal sizes, and the fused
    normalisation (as float32 values)."""

    patch: int
    merge: int
    temporal: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def width(self) -> int:
        """Values per patch row of `pixel_values`."""
        return len(self.mean) * self.temporal * self.patch * self.patch

    @classmethod
    def of(cls, processor) -> "PatchLayout | None":
        """The layout of this processor, checked against it; None where it differs in anything."""
        try:
            layout = cls._read(processor)
            if layout is not None and layout.matches(processor):
                return layout
        except Exception as exc:  # an unexpected processor: keep its own path
            log.warning("vision fast path disabled: %s: %s", type(exc).__name__, str(exc)[:200])
            return None
        log.warning("vision fast path disabled: the processor's pixels differ from the patch layout's")
        return None

    @classmethod
    def _read(cls, processor) -> "PatchLayout | None":
        import torch

        images, videos = processor.image_processor, getattr(processor, "video_processor", None)
        sizes = {(p.patch_size, p.merge_size, p.temporal_patch_size, tuple(p.image_mean), tuple(p.image_std),
                  p.rescale_factor, p.do_rescale, p.do_normalize) for p in (images, videos) if p is not None}
        if len(sizes) != 1:
            return None
        patch, merge, temporal, mean, std, rescale, do_rescale, do_normalize = sizes.pop()
        if not (do_rescale and do_normalize):
            return None
        # As transformers fuses them (image_processing_backends: float32 tensors).
        return cls(int(patch), int(merge), int(temporal),
                   tuple((torch.tensor(mean) * (1.0 / rescale)).tolist()),
                   tuple((torch.tensor(std) * (1.0 / rescale)).tolist()))

    def matches(self, processor) -> bool:
        """Whether `write` gives the processor's own pixel values, bit for bit, on a probe image
        holding each of the 256 values in each channel at varied places and on a probe video of
        three frames (padded to the temporal size)."""
        import torch
        from PIL import Image

        side = 4 * self.patch * self.merge
        ramp = np.arange(side * side, dtype=np.int64).reshape(side, side, 1)
        probe = ((ramp * np.array([1, 7, 13]) + np.array([0, 85, 170])) % 256).astype(np.uint8)  # odd steps: all 256
        official = processor.image_processor(images=[Image.fromarray(probe)], do_resize=False,
                                             return_tensors="pt")
        image = Pixels(torch.from_numpy(probe).permute(2, 0, 1)[None].contiguous(), self.grid(1, side, side))
        if not same_pixels(self.written([image], torch.device("cpu")), official["pixel_values"]):
            return False
        if getattr(processor, "video_processor", None) is None:
            return True
        frames = torch.from_numpy(np.stack([probe, probe[::-1], probe[:, ::-1]])).permute(0, 3, 1, 2)
        videos = processor.video_processor
        quiet = {"cap_pixels_per_frame": False} if hasattr(videos, "cap_pixels_per_frame") else {}
        official = videos(
            videos=[frames.float()], do_resize=False, do_sample_frames=False,
            return_tensors="pt", return_metadata=True, **quiet,
            video_metadata=[{"fps": 2.0, "frames_indices": [0, 1, 2], "total_num_frames": 3}])
        video = Pixels(frames.contiguous(), self.grid(3, side, side))
        return same_pixels(self.written([video], torch.device("cpu")), official["pixel_values_videos"])

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return -(-frames // self.temporal), height // self.patch, width // self.patch

    def image(self, data, channels_last: bool = False) -> Pixels:
        """One resized RGB image, uint8 (3, H, W) or, `channels_last`, (H, W, 3), as Pixels."""
        height, width = data.shape[:2] if channels_last else data.shape[1:]
        return Pixels(data.contiguous()[None], self.grid(1, height, width), channels_last)

    def written(self, parts: list[Pixels], device, into=None) -> Any:
        """The float32 pixel rows of `parts`, in order, on `device` (their frames are there), in
        `into` (float32, as many values) when given."""
        import torch

        shape = (sum(p.patches for p in parts), self.width)
        out = torch.empty(shape, dtype=torch.float32, device=device) if into is None else into.view(shape)
        row = 0
        for part in parts:
            self.write(part.frames, part.grid, out[row:row + part.patches])
            row += part.patches
        return out

    def write(self, frames, grid: tuple[int, int, int], out) -> None:
        """The processor's pixel rows of one image or video into `out` (float32, its rows): the
        frames taken in patch order, less mean' (one op with the copy), then divided by std', as
        torchvision's normalize computes it. An image's frame is normalised once and copied to the
        other temporal slots; a video's frames are padded to whole temporal groups with the last
        one, as the video processor pads its normalised frames. On the CPU a few rows of merge
        groups at a time, so that each block is still in cache for its next step."""
        import torch

        t, h, w = grid
        p, m, k = self.patch, self.merge, self.temporal
        channels = frames.shape[1]
        a, b = h // m, w // m
        dest = out.view(t, a, b, m, m, channels, k, p, p)
        mean, std = (c.view(channels, 1, 1, 1) for c in self._constants(out.device))
        image = frames.shape[0] == 1 and k > 1
        if image:
            source = frames.view(1, channels, a, m, p, b, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
        else:
            if frames.shape[0] < t * k:
                frames = _padded(frames, t * k)
            source = frames.view(t, k, channels, a, m, p, b, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        step = a if out.device.type != "cpu" else max(1, CPU_BLOCK_VALUES // (b * m * m * channels * p * p))
        for row in range(0, a, step):
            block = dest[:, row:row + step]
            first = block[:, :, :, :, :, :, :1] if image else block
            torch.sub(source[:, row:row + step], mean, out=first)
            first.div_(std)
            for slot in range(1, k) if image else ():
                block[:, :, :, :, :, :, slot:slot + 1].copy_(first)

    def _constants(self, device):
        return _constants(self.mean, self.std, str(device))


def _padded(frames, count: int):
    """`frames` followed by its last frame repeated up to `count` frames."""
    import torch

    return torch.cat((frames, frames[-1:].expand(count - frames.shape[0], *frames.shape[1:])))


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple[float, ...], std: tuple[float, ...], device: str):
    import torch

    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def same_pixels(ours, theirs) -> bool:
    """Bit for bit: the same dtype, shape and values (theirs None: never)."""
    import torch

    if theirs is None:
        return False

    return ours.dtype == theirs.dtype and torch.equal(ours, theirs)
