"""A cache of values by key, bounded by the values' bytes: the embedding cache's (outputs/cache.py)
and the images' prepared pixels' (inputs/media_reader.py). Imports nothing beyond the standard
library, so that any layer may hold one."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


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
