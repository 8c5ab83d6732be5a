"""The values some request fields take, which every end shares: the priorities and the embedding
encodings. Imports nothing, so that the daemon's engine and encoders use them without the wire's codec."""

from __future__ import annotations

# Request priorities (PROTOCOL.md): someone waits on interactive work (a search's query); batch work
# is bulk (re-embedding a store) and yields to it, down to the decoder layer (the daemon's engine).
INTERACTIVE, BATCH = "interactive", "batch"
PRIORITIES = (INTERACTIVE, BATCH)
COMPACT = ("int8", "uint8", "binary", "ubinary")  # the compact encodings (PROTOCOL.md)
SCALED = ("int8", "uint8")  # the ones that need a per-dimension map
PACKED = ("binary", "ubinary")  # the ones that pack 8 components into a byte


def row_bytes(encoding: str, dimension: int) -> int:
    """Elements per row of `encoding` (packed types: bytes; the others: components)."""
    return dimension // 8 if encoding in PACKED else dimension
