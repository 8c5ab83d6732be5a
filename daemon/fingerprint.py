"""Model fingerprints: a short hex digest of the files a model is loaded from.

A fingerprint changes whenever a weight byte, the config, the tokenizer, the processor settings or the
chat template changes, and is equal wherever the same files are served: it digests each file's
content (sha256) by name, never a path, a time or a host. Two indexes built under the same
fingerprint hold comparable vectors; a client pins one with `expect_fingerprint`.

Cheap on a repeated start: a file in a Hugging Face hub snapshot is a link to a blob that the hub
names by its content's sha256 (LFS files: the weights), so that name is taken as it is; any other file
is hashed once and its digest kept in a small cache keyed by its real path and by its size, mtime,
ctime, inode and device, so that a changed or replaced file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

log = logging.getLogger(__name__)

FINGERPRINT_HEX = 20  # 80 bits: short to read, and no two checkpoints will share one by chance
# The files that loading reads (weights, config, tokenizer, processor, chat template): only these
# count, so a README, a license or a stray .bin beside them changes nothing.
MODEL_FILES = frozenset({
    "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
})
WEIGHTS_SUFFIX = ".safetensors"
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
CACHE_FILE_MAX_BYTES = 4 << 20  # a digest cache larger than this is not ours: ignored
CACHE_ENTRIES_MAX = 4096
HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class Fingerprint:
    value: str  # FINGERPRINT_HEX lowercase hex digits
    files: int  # files digested
    bytes: int  # their size in all
    hashed_bytes: int  # bytes read and hashed now (0 when every digest was known)
    seconds: float


def model_directory(name: str) -> Path:
    """The directory a model's files were loaded from: `name` itself, or its hub snapshot."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    if not isinstance(found, str):
        raise ModelLoadError(f"cannot fingerprint model {name!r}: its files are not in the hub cache")
    return Path(found).parent


def model_files(directory: Path) -> list[Path]:
    """The files of `directory` that loading reads, by name (top level only, as loading reads them)."""
    return sorted((p for p in directory.iterdir()
                   if (p.name in MODEL_FILES or p.name.endswith(WEIGHTS_SUFFIX)) and p.is_file()),
                  key=lambda p: p.name.encode())


class DigestCache:
    """sha256 digests of files, by real path and identity (size, mtime, ctime, inode, device).

    Read once, written back atomically (merged with what another daemon wrote meanwhile) when it
    learned something. Unreadable, corrupt or unwritable: the digests are computed, never trusted."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries = self._read() if path is not None else {}
        self._learned: dict[str, dict] = {}

    def _read(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read(CACHE_FILE_MAX_BYTES + 1) or b"{}")
        except (OSError, ValueError):
            return {}
        entries = data.get("files") if isinstance(data, dict) else None
        return entries if isinstance(entries, dict) else {}

    @staticmethod
    def identity(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def get(self, real: str, st: os.stat_result) -> str | None:
        entry = self._entries.get(real)
        if isinstance(entry, dict) and entry.get("id") == self.identity(st):
            digest = entry.get("sha256")
            if isinstance(digest, str) and _SHA256_NAME.fullmatch(digest):
                return digest
        return None

    def put(self, real: str, st: os.stat_result, digest: str) -> None:
        self._learned[real] = {"id": self.identity(st), "sha256": digest}

    def save(self) -> None:
        if self.path is None or not self._learned:
            return
        # Entries of files that are gone (a deleted checkpoint) go too, so the file only holds the living.
        entries = {path: entry for path, entry in {**self._read(), **self._learned}.items() if os.path.exists(path)}
        if len(entries) > CACHE_ENTRIES_MAX:  # keep the newest: what this daemon just learned last
            entries = dict(list(entries.items())[-CACHE_ENTRIES_MAX:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".fingerprints.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "files": entries}, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.info("fingerprint cache %s not written (%s); digests are recomputed on the next start",
                     self.path, exc.strerror or exc)


def _hub_blob_digest(path: Path) -> str | None:
    """The sha256 a hub snapshot's link names: its target is `blobs/<sha256>` for LFS files."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _SHA256_NAME.fullmatch(target.name):
        return target.name
    return None


def _sha256(f) -> str:
    """sha256 of an open file, read in large chunks (hashlib releases the GIL on each)."""
    h, buffer = hashlib.sha256(), bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    while n := f.readinto(buffer):
        h.update(view[:n])
    return h.hexdigest()


def _hash_file(path: Path) -> tuple[str, os.stat_result]:
    """sha256 of the file read through one descriptor, with that descriptor's identity; a file that
    changes while it is read is refused (the digest would describe neither version)."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        digest = _sha256(f)
        after = os.fstat(f.fileno())
    if DigestCache.identity(before) != DigestCache.identity(after):
        raise ModelLoadError(f"{path} changed while it was being fingerprinted; start again once it is written")
    return digest, before


def file_digest(path: Path, cache: DigestCache) -> tuple[str, int, int]:
    """(sha256, size, bytes hashed now) of one model file."""
    blob = _hub_blob_digest(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{path} is not a regular file")
    if blob is not None:
        return blob, st.st_size, 0
    real = os.path.realpath(path)
    known = cache.get(real, st)
    if known is not None:
        return known, st.st_size, 0
    digest, st = _hash_file(path)
    cache.put(real, st, digest)
    return digest, st.st_size, st.st_size


def fingerprint_directory(directory: Path, cache: DigestCache) -> Fingerprint:
    """The fingerprint of the model files in `directory`: sha256 over their names and digests."""
    began = time.monotonic()
    files = model_files(directory)
    if not any(f.name.endswith(WEIGHTS_SUFFIX) for f in files):
        raise ModelLoadError(f"cannot fingerprint {directory}: it holds no *.safetensors weights")
    manifest, total, hashed = hashlib.sha256(), 0, 0
    for path in files:
        try:
            digest, size, read = file_digest(path, cache)
        except OSError as exc:
            raise ModelLoadError(f"cannot fingerprint {path}: {exc.strerror or exc}") from None
        manifest.update(f"{path.name}\t{digest}\n".encode())
        total, hashed = total + size, hashed + read
    cache.save()
    return Fingerprint(manifest.hexdigest()[:FINGERPRINT_HEX], len(files), total, hashed, time.monotonic() - began)


def fingerprint_model(name: str, cache_path: Path | None) -> Fingerprint:
    return fingerprint_directory(model_directory(name), DigestCache(cache_path))
