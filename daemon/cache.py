"""An optional embedding cache: identical input + instruction + model gives the stored vector.

It stores the raw pooled vector (full dimension, before the cut and normalisation), so one entry
serves every `dimension` and `normalize`. Bounded by bytes, least recently used first out.
Inputs that name paths or URLs are never cached: what they point at can change.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

if TYPE_CHECKING:  # inputs.py keeps its image cache here
    from .inputs import InputItem


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


class BoundedCache:
    """Values with an `nbytes` by key, bounded by their bytes, least recently used first out;
    shared by threads. A value is stored as given: callers never change one afterwards."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes | None) -> Any:
        if key is None:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes | None, value: Any) -> None:
        if key is None or value.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes


class EmbeddingCache(BoundedCache):
    def put(self, key: bytes | None, vector: np.ndarray) -> None:
        super().put(key, vector.copy())  # the caller's array may be a view of a whole batch
