"""The input ids of a conversation with images and videos, without the processor.

The chat template renders each image as `<|vision_start|><|image_pad|><|vision_end|>` and each
video with `<|video_pad|>`; the processor then replaces each pad, in order, with the image's tokens
(one pad per merged patch) or the video's (per temporal group a timestamp text and that many pads
between vision start and end), and tokenises the result. A tokenizer splits at added tokens before
anything else, so the ids of that text are the ids of the text with single pads, each single pad id
replaced by the ids of its replacement: an image's are pad ids only; a video's are the processor's
own replacement text (`replace_video_token`) tokenised on its own. The text fast path gives the
ids with single pads. The models check this against the processor on probes at start
(`models._QwenVL._check_vision_ids`) and keep the processor's path where it differs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from daemon.inputs.media.pixels import Pixels


@dataclass(frozen=True)
class Video:
    """A prepared video: its pixels and the metadata its timestamps come from."""

    pixels: Pixels
    metadata: Any  # transformers' VideoMetadata


@dataclass(frozen=True)
class VisionTokens:
    processor: Any
    image_pad: int
    video_pad: int
    merge: int

    @classmethod
    def of(cls, processor) -> "VisionTokens":
        tok = processor.tokenizer
        return cls(processor, tok.convert_tokens_to_ids(processor.image_token),
                   tok.convert_tokens_to_ids(processor.video_token), int(processor.image_processor.merge_size))

    @functools.cached_property
    def image_item(self) -> str:
        """What the chat template renders for one image."""
        p = self.processor
        return p.vision_start_token + p.image_token + p.vision_end_token

    @functools.cached_property
    def video_item(self) -> str:
        p = self.processor
        return p.vision_start_token + p.video_token + p.vision_end_token

    @staticmethod
    def video(pixels: Pixels, metadata: Any) -> Video:
        """A video with its metadata as the processor takes it (a dict from qwen_vl_utils)."""
        from transformers.video_utils import make_batched_metadata

        return Video(pixels, make_batched_metadata([pixels.frames], [metadata])[0])

    def expand(self, ids: list[int], images: list[Pixels], videos: list[Video]) -> list[int]:
        """`ids` with each single image or video pad replaced by its tokens, in order. ValueError
        when the pads and the media do not pair up."""
        if ids.count(self.image_pad) != len(images) or ids.count(self.video_pad) != len(videos):
            raise ValueError("the rendered conversation's vision pads do not match its media")
        images_left, videos_left = iter(images), iter(videos)
        merged = self.merge * self.merge
        out: list[int] = []
        for token in ids:
            if token == self.image_pad:
                out.extend([token] * (next(images_left).patches // merged))
            elif token == self.video_pad:
                out.extend(self._video_ids(next(videos_left)))
            else:
                out.append(token)
        return out

    def _video_ids(self, video: Video) -> list[int]:
        import torch

        text = self.processor.replace_video_token(
            {"video_grid_thw": torch.tensor([video.pixels.grid]), "video_metadata": [video.metadata]}, 0)
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
