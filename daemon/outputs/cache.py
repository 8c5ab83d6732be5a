"""An optional embedding cache: identical input + instruction + model gives the stored vector.

It stores the raw pooled vector (full dimension, before the cut and normalisation), so one entry
serves every `dimension` and `normalize`. Bounded by bytes, least recently used first out.
Inputs that name paths or URLs are never cached: what they point at can change.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from daemon.bounded import BoundedCache

if TYPE_CHECKING:
    from qwen3vl_client.inputs import InputItem


def cache_key(model: str, item: InputItem, instruction: str | None) -> bytes | None:
    media = list(item.images) + [f for v in item.videos for f in (v.frames or (v.file,))]
    if any(m.kind != "bytes" for m in media):
        return None
    canonical = msgpack.packb([
        model, item.instruction or instruction, list(item.texts), [m.value for m in item.images],
        [[f.value for f in v.frames] if v.frames else v.file.value for v in item.videos],
        item.fps, item.max_frames,
    ], use_bin_type=True)
    return hashlib.blake2b(canonical, digest_size=20).digest()


class EmbeddingCache(BoundedCache):
    def put(self, key: bytes | None, vector: np.ndarray) -> None:
        if key is not None and vector.nbytes <= self.max_bytes:  # copied only to be kept
            super().put(key, vector.copy())  # the caller's array may be a view of a whole batch
