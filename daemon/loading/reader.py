"""Reading safetensors files straight into the memory a model will own, at the page cache's speed.

transformers maps a safetensors file and, on the CPU, hands out views of that mapping; the daemon
then had to copy every weight out of it (a served weight must not change when the file is written
over, and a truncated file must not kill the process), so each weight was read twice, through 4 KB
page faults. Here each tensor is allocated once, in the dtype and on the device the model holds it
in, and its bytes are read into it with large `preadv` calls from several threads (the kernel
copies from the page cache; reads release the GIL). Where the dtype or the device differs, the
bytes pass through one staging buffer per thread (pinned on CUDA, so the copy to the device is a
DMA) and are converted there: no full host copy is ever made.

A file is read through one descriptor whose identity (size, mtime, ctime, inode, device) is checked
against what was fingerprinted before reading and must be the same after: a file written while it
is read stops the load in one line. A file whose digest is not known yet is hashed as its bytes pass
(the reading threads ahead, one thread hashing in the file's order), so a first start reads each
file once.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daemon.errors import ModelLoadError, first_line
from daemon.inputs.files import SettingFileError, open_regular
from daemon.loading.fingerprint import DigestCache

PIECE_BYTES = 64 << 20  # one read (and one staging buffer): large enough to stream, small enough to pipeline
HEADER_MAX_BYTES = 100 << 20  # safetensors' own limit on the JSON header
MAX_ELEMENTS = 1 << 40  # a tensor's elements (and any offset): 2 TB in bfloat16, far past any model's
MAX_DIMS = 16
READ_THREADS = 4  # more gave nothing on the 2-core host (BENCHMARKS.md, issue 36)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
Identity = tuple[int, ...]  # size, mtime, ctime, inode, device (DigestCache.identity)


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # torch's name for the file's dtype
    shape: tuple[int, ...]
    start: int  # the bytes' offsets in the file
    end: int


@dataclass(frozen=True)
class Header:
    entries: tuple[Entry, ...]  # in the file's order
    metadata: dict[str, str]


@dataclass(frozen=True)
class FileRead:
    path: Path
    identity: Identity
    digest: str | None  # sha256 of the whole file, when it was hashed as it passed
    bytes: int
    metadata: dict  # the header's __metadata__


@dataclass(frozen=True)
class Target:
    """Where and in what dtype the model holds a tensor; None keeps the file's."""

    dtype: object = None  # a torch.dtype for floating tensors
    device: object = None  # a torch.device


def parse_header(length: int, raw: bytes, file_size: int, where: str) -> Header:
    """The tensors a safetensors file holds (`raw`: its JSON header of `length` bytes), checked:
    known dtypes, sizes that match their shapes, offsets that tile the data exactly (no hole, no
    overlap) up to the file's end."""
    def refuse(why: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: not a safetensors file ({why})")

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise refuse("its header is not JSON") from None
    if not isinstance(data, dict):
        raise refuse("its header is not a JSON object")
    metadata = data.pop("__metadata__", None) or {}
    entries = []
    for name, spec in data.items():
        try:
            dtype, shape, (start, end) = DTYPES[spec["dtype"]], tuple(spec["shape"]), spec["data_offsets"]
            if not all(type(n) is int and 0 <= n <= MAX_ELEMENTS for n in (*shape, start, end)) or \
                    _numel(shape) > MAX_ELEMENTS or len(shape) > MAX_DIMS:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise refuse(f"tensor {name[:80]!r} has no valid dtype, shape and offsets") from None
        entries.append(Entry(name, dtype, shape, 8 + length + start, 8 + length + end))
    entries.sort(key=lambda e: (e.start, e.end))
    position = 8 + length
    for entry in entries:
        if entry.start != position or entry.end - entry.start != _numel(entry.shape) * _itemsize(entry.dtype):
            raise refuse(f"tensor {entry.name[:80]!r} does not fit its place")
        position = entry.end
    if position != file_size:
        raise refuse(f"{file_size - position:+d} bytes after its tensors")
    return Header(tuple(entries), metadata if isinstance(metadata, dict) else {})


def read_files(paths: list[Path], target: Callable[[Entry], Target],
               expect: dict[Path, Identity] | None = None, hashed: frozenset[Path] = frozenset(),
               threads: int = READ_THREADS, private: bool = False,
               wanted: Callable[[str], bool] | None = None,
               digests: dict[Path, str] | None = None) -> tuple[dict[str, object], list[FileRead]]:
    """Every tensor of the safetensors files `paths`, by name, each placed as `target` says. A file
    with an identity in `expect` must still have it; those in `hashed` are hashed as they pass. `private`: each file must be the daemon's user's and writable by no one else.
    `wanted(name)` False: the tensor is not kept (its bytes are still hashed when the file is).
    `digests`: a file with another identity than expected but a known digest (its metadata alone
    changed: a chmod, a touch, the same bytes copied back) is hashed as it passes, and refused
    unless its bytes still have that digest.
    ModelLoadError, in one line, for a file that is not safetensors, cannot be read, or changes
    while it is read."""
    tensors: dict[str, object] = {}
    reads = []
    for path in paths:
        with _open(path, private) as f:
            fd = f.fileno()
            before = _identity(fd)
            expected, vouched = (expect or {}).get(path), (digests or {}).get(path)
            recheck = expected is not None and tuple(expected) != before
            if recheck and vouched is None:
                raise _changed_since_fingerprinted(path)
            header, raw = _header_of(fd, before[0], str(path))
            placed = {e.name: _allocate(e, target(e), path) for e in header.entries
                      if wanted is None or wanted(e.name)}
            hashing = path in hashed or recheck
            pieces = [p for e in header.entries for p in _pieces(e, placed.get(e.name))]
            if not hashing:
                pieces = [p for p in pieces if p.tensor is not None]
            try:
                digest = _read_hashing(fd, raw, pieces, threads) if hashing else _read_parallel(fd, pieces, threads)
            except _CutShort:
                raise ModelLoadError(f"{path} changed while it was being loaded (cut short); start again once it "
                                     "is written") from None
            except OSError as exc:
                raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
            if _identity(fd) != before:
                raise ModelLoadError(f"{path} changed while it was being loaded; start again once it is written")
            if recheck and digest != vouched:
                raise _changed_since_fingerprinted(path)
        tensors.update(placed)
        reads.append(FileRead(path, before, digest, before[0], header.metadata))
    return tensors, reads


# -- internals --------------------------------------------------------------------------------------
def _changed_since_fingerprinted(path: Path) -> ModelLoadError:
    return ModelLoadError(f"{path} changed after the daemon fingerprinted it; start the daemon again once the "
                          "model's files are written, so that its fingerprint is theirs")


def _open(path: Path, private: bool = False):
    try:
        return open_regular(path, private)
    except SettingFileError as exc:
        raise ModelLoadError(f"cannot load weights: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


def _identity(fd: int) -> Identity:
    return tuple(DigestCache.identity(os.fstat(fd)))


def _header_of(fd: int, size: int, where: str) -> tuple[Header, bytes]:
    """The parsed header and its raw bytes (length prefix included: a digest covers them)."""
    first = _pread_exact(fd, 8, 0, where) if size >= 8 else b""
    if len(first) < 8:
        raise ModelLoadError(f"{where}: not a safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", first)
    if length > HEADER_MAX_BYTES or 8 + length > size:
        raise ModelLoadError(f"{where}: not a safetensors file (a header of {length} bytes)")
    raw = _pread_exact(fd, length, 8, where)
    return parse_header(length, raw, size, where), first + raw


def _pread_exact(fd: int, n: int, offset: int, where: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ModelLoadError(f"{where} changed while it was being loaded (cut short); start again once it is written")
    return data


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: str) -> int:
    import torch

    return getattr(torch, dtype).itemsize


def _allocate(entry: Entry, target: Target, path: Path):
    """The tensor the entry is read into; ModelLoadError, naming the file, where it cannot be had."""
    import torch

    file_dtype = getattr(torch, entry.dtype)
    dtype = target.dtype if target.dtype is not None and file_dtype.is_floating_point else file_dtype
    try:
        return torch.empty(entry.shape, dtype=dtype, device=target.device or "cpu")
    except (RuntimeError, MemoryError) as exc:  # out of memory on the device or the host
        raise ModelLoadError(f"cannot load {path}: no memory for tensor {entry.name[:80]!r} "
                             f"({first_line(exc)[:120]})") from None


@dataclass(frozen=True)
class _Piece:
    """Bytes [start, end) of the file, which are elements [first, first + count) of `tensor` (None:
    a tensor not kept, read only to be hashed)."""

    start: int
    end: int
    tensor: object
    file_dtype: str
    first: int
    count: int

    @property
    def direct(self) -> bool:  # read straight into the tensor's memory
        return self.tensor is not None and self.tensor.device.type == "cpu" and \
            str(self.tensor.dtype) == f"torch.{self.file_dtype}"

    @property
    def pinned(self) -> bool:  # staged for a CUDA tensor: its staging buffer is pinned
        return self.tensor is not None and self.tensor.device.type == "cuda"


def _pieces(entry: Entry, tensor) -> list[_Piece]:
    size = _itemsize(entry.dtype)
    per = max(1, PIECE_BYTES // size)
    count = _numel(entry.shape)
    return [_Piece(entry.start + first * size, entry.start + min(count, first + per) * size, tensor, entry.dtype,
                   first, min(per, count - first)) for first in range(0, count, per)]


def _bytes_of(piece: _Piece):
    """The piece's place in its tensor's memory, as a writable buffer (direct pieces only)."""
    import torch

    flat = piece.tensor.reshape(-1)[piece.first:piece.first + piece.count]
    return memoryview(flat.view(torch.uint8).numpy())


class _CutShort(Exception):
    """The file ended before a tensor's bytes did: it was cut while being read."""


def _read_into(fd: int, buffer: memoryview, offset: int) -> None:
    done, n = 0, len(buffer)
    while done < n:
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise _CutShort
        done += got


class _Staging:
    """One thread's staging buffer (pinned where the tensor's device is CUDA) and the event that
    says when the device has taken its last copy."""

    def __init__(self):
        self.buffer = None
        self.event = None

    def take(self, piece: _Piece):
        import torch

        if self.buffer is None:
            self.buffer = torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=piece.pinned)
        if self.event is not None:
            self.event.synchronize()  # the device's copy of the previous piece is done
        return self.buffer[:piece.end - piece.start]

    def land(self, piece: _Piece, staged) -> None:
        """Convert the staged bytes into the piece's place in its tensor (on its device)."""
        import torch

        if piece.tensor is None:
            return
        source = staged.view(getattr(torch, piece.file_dtype))
        place = piece.tensor.reshape(-1)[piece.first:piece.first + piece.count]
        cuda = place.device.type == "cuda"
        place.copy_(source, non_blocking=cuda)
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()


def _read_piece(fd: int, piece: _Piece, staging: _Staging) -> None:
    if piece.direct:
        _read_into(fd, _bytes_of(piece), piece.start)
        return
    staged = staging.take(piece)
    _read_into(fd, memoryview(staged.numpy()), piece.start)
    staging.land(piece, staged)


def _read_parallel(fd: int, pieces: list[_Piece], threads: int) -> None:
    """Read the pieces in any order, on `threads` threads; returns None (no digest)."""
    local = threading.local()

    def read(piece: _Piece) -> None:
        if not hasattr(local, "staging"):
            local.staging = _Staging()
        _read_piece(fd, piece, local.staging)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="qwen3vl-read") as pool:
        list(pool.map(read, pieces))
    _settle(pieces)


def _read_hashing(fd: int, header: bytes, pieces: list[_Piece], threads: int) -> str:
    """Read the pieces on `threads` threads while this one hashes them in the file's order (sha256
    is sequential): the file is read once. Staged pieces take the staging buffers of a ring in
    their order, each waiting for its buffer's previous piece to be hashed and landed; a piece
    never waits for a later one, so the ring cannot deadlock."""
    import torch

    digest = hashlib.sha256(header)
    ring_size = max(2, threads + 1)
    ring: list = [None] * ring_size
    order = {index: n for n, index in enumerate(i for i, p in enumerate(pieces) if not p.direct)}
    landed = [threading.Event() for _ in order]  # by staged order: hashed, landed, its buffer free
    stopping = threading.Event()

    def read(index: int):
        piece = pieces[index]
        if piece.direct:
            buffer = _bytes_of(piece)
            _read_into(fd, buffer, piece.start)
            return buffer, None
        n = order[index]
        while n >= ring_size and not landed[n - ring_size].wait(0.1):
            if stopping.is_set():
                raise _Stopped
        slot = n % ring_size
        if ring[slot] is None:
            ring[slot] = torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=piece.pinned)
        staged = ring[slot][:piece.end - piece.start]
        buffer = memoryview(staged.numpy())
        _read_into(fd, buffer, piece.start)
        return buffer, (n, staged)

    staging = _Staging()
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="qwen3vl-read") as pool:
        futures = [pool.submit(read, index) for index in range(len(pieces))]
        try:
            for piece, future in zip(pieces, futures):
                buffer, held = future.result()
                digest.update(buffer)
                if held is not None:
                    staging.land(piece, held[1])
                    if staging.event is not None:
                        staging.event.synchronize()
                    landed[held[0]].set()
        finally:
            stopping.set()
            for future in futures:
                future.cancel()
    _settle(pieces)
    return digest.hexdigest()


class _Stopped(Exception):
    """The hashing side stopped (it failed): the readers stop too."""


def _settle(pieces: list[_Piece]) -> None:
    """Wait for the devices' copies of staged pieces (CUDA copies are asynchronous)."""
    import torch

    if any(p.pinned for p in pieces):
        torch.cuda.synchronize()
