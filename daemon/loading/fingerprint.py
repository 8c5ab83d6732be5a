"""Model fingerprints: a short hex digest of the files a model is loaded from.

A fingerprint changes whenever a weight byte, the config, the tokenizer, the processor settings or the
chat template changes, and is equal wherever the same files are served: it digests each file's
content (sha256) by name, never a path, a time or a host. Two indexes built under the same
fingerprint hold comparable vectors; a client pins one with `expect_fingerprint`.

It vouches for the bytes the model is built from, so no name is taken at its word: every file is read
and hashed (a hub blob's sha256 name is checked against its content, and a blob that does not match
is refused), before the weights are loaded, and `Fingerprint.check_unchanged` after loading confirms
that every file still has the identity it had when hashed (a file replaced or written meanwhile
stops the start). Cheap on a repeated start all the same: a digest is kept in a small cache keyed by
the file's real path and its size, mtime, ctime, inode and device, so a changed or replaced file is
hashed again. Whoever can write the model files or that cache can change what a fingerprint vouches
for: the cache is trusted only when the daemon's own user owns it and nobody else can write it.
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
from dataclasses import dataclass, replace
from pathlib import Path

from daemon.errors import ModelLoadError, first_line
from daemon.inputs.files import SettingFileError, open_regular, read_setting_file

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


Identity = tuple[str, tuple[int, ...]]  # a file's real path, and its size, mtime, ctime, inode, device


@dataclass(frozen=True)
class Fingerprint:
    value: str  # FINGERPRINT_HEX lowercase hex digits
    files: int  # files digested
    bytes: int  # their size in all
    hashed_bytes: int  # bytes read and hashed now (0 when every digest was known)
    seconds: float
    directory: Path | None = None  # where the files are
    identities: tuple[tuple[str, Identity], ...] = ()  # (name, identity) of each file, as it was hashed
    digests: tuple[tuple[str, str | None], ...] = ()  # (name, sha256) of each file; None while pending
    pending: tuple[str, ...] = ()  # weight files whose digest the load computes (value "" until then)

    def completed(self, hashed: dict[str, tuple[str, tuple]], cache: DigestCache) -> "Fingerprint":
        """This fingerprint with the pending files' digests, from `hashed` (a path's sha256 and the
        identity of the file as read, by path): each must be the very file stat'ed at fingerprinting,
        and a hub blob's name must be its digest. The cache learns the digests."""
        identities, digests, extra = dict(self.identities), dict(self.digests), 0
        for name in self.pending:
            path = self.directory / name
            digest, identity = hashed.get(str(path), (None, None))
            if digest is None or tuple(identity) != tuple(identities[name][1]):
                raise ModelLoadError(f"{path} changed while the model was loading; start again once it is written")
            real = identities[name][0]
            _check_blob_name(path, real, digest)
            cache.put_identity(real, identity, digest)  # the file as read, not as it may be by now
            digests[name], extra = digest, extra + identity[0]
        cache.save()
        ordered = tuple((name, digests[name]) for name, _ in self.digests)
        return replace(self, value=_manifest(ordered), digests=ordered, pending=(),
                       hashed_bytes=self.hashed_bytes + extra)

    def check_unchanged(self, since: str = "while the model was loading",
                        advice: str = "start again once the model's files are written") -> None:
        """Raise ModelLoadError, naming the file, unless the directory still holds exactly the files
        that were hashed, each with the identity it had then. Called once the model is loaded: a file
        replaced or rewritten meanwhile may be what was loaded, and the fingerprint would not be its."""
        now = model_files(self.directory)
        for name, identity in self.identities:
            path = now.pop(name, None)
            if path is None or not self._same(name, path, identity):
                raise ModelLoadError(f"{self.directory / name} changed {since}; {advice}")
        if now:
            raise ModelLoadError(f"{next(iter(now.values()))} appeared {since}; {advice}")

    def _same(self, name: str, path: Path, identity: Identity) -> bool:
        """Whether `path` is still the file that was hashed: the same identity, or, when only its
        metadata changed (a chmod, a touch, a byte-identical copy put back), the same content."""
        try:
            if _identity(path) == identity:
                return True
            digest = dict(self.digests).get(name)
            return digest is not None and os.path.realpath(path) == identity[0] and _hash_file(path)[0] == digest
        except (OSError, ModelLoadError):
            return False


def _identity(path: Path) -> Identity:
    return os.path.realpath(path), tuple(DigestCache.identity(os.stat(path)))


def model_directory(name: str, local_files_only: bool = False) -> Path:
    """The directory a model is loaded from: `name` itself, or its hub snapshot (fetched into the hub
    cache first, unless `local_files_only`, when it is not complete there yet), so that the files are
    fingerprinted before the weights are loaded, and loaded from the very directory that was."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")):  # a path, never a hub id: say what is wrong with it
        what = "is not a directory" if Path(name).expanduser().exists() else "does not exist"
        raise ModelLoadError(f"cannot load model {name!r}: the directory {what}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=local_files_only,
                                      allow_patterns=[*MODEL_FILES, f"*{WEIGHTS_SUFFIX}"]))
    except Exception as exc:  # offline, not in the cache, no such repository: one line
        reason = first_line(exc)[:160]
        raise ModelLoadError(f"cannot load model {name!r}: its files are not in the hub cache and could not be "
                             f"downloaded ({reason}); pass a local checkpoint directory, or build a test checkpoint "
                              "with `qwen3vl-daemon tiny-checkpoint DIR` and pass DIR") from None


INDEX_FILE = "model.safetensors.index.json"
TEMPLATES_DIR = "additional_chat_templates"  # transformers loads these chat templates too
INDEX_MAX_BYTES = 64 << 20


def model_files(directory: Path) -> dict[str, Path]:
    """The files of `directory` that loading reads, by their path relative to it: the top level's
    model files, the chat templates in `additional_chat_templates/`, and every weight file the
    index names (at any depth, but never outside `directory`)."""
    found = {p.name: p for p in directory.iterdir()
             if (p.name in MODEL_FILES or p.name.endswith(WEIGHTS_SUFFIX)) and p.is_file()}
    templates = directory / TEMPLATES_DIR
    if templates.is_dir():
        found.update({f"{TEMPLATES_DIR}/{p.name}": p for p in templates.iterdir() if p.is_file()})
    for name in _indexed_weights(directory):
        found[name] = directory / name
    return dict(sorted(found.items(), key=lambda item: item[0].encode()))


def weight_files(directory: Path) -> list[Path]:
    """Every weight file loading may read from `directory` (see `model_files`)."""
    return [path for name, path in model_files(directory).items() if name.endswith(WEIGHTS_SUFFIX)]


def loaded_weight_files(directory: Path) -> list[Path]:
    """The weight files loading builds the model from, as transformers picks them: model.safetensors
    when it exists, else those the sharded checkpoint's index names, else every top-level
    *.safetensors (so a full copy beside an index is not counted twice)."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    indexed = _indexed_weights(directory)
    if indexed:
        return [directory / name for name in sorted(indexed)]
    return sorted(p for p in directory.glob(f"*{WEIGHTS_SUFFIX}") if p.is_file())


def _indexed_weights(directory: Path) -> set[str]:
    """The weight files a sharded checkpoint's index names, as relative paths."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return set()
    try:
        data = json.loads(read_setting_file(index, INDEX_MAX_BYTES))
        names = set((data.get("weight_map") or {}).values())
    except (OSError, SettingFileError, ValueError, RecursionError, AttributeError, TypeError) as exc:
        raise ModelLoadError(f"{index}: not a safetensors index ({str(exc)[:80]})") from None
    for name in names:
        parts = Path(name).parts if isinstance(name, str) else ()
        if not parts or Path(name).is_absolute() or ".." in parts or not name.endswith(WEIGHTS_SUFFIX):
            raise ModelLoadError(f"{index}: names {str(name)[:80]!r} as a weight file; only *.safetensors "
                                 f"inside {directory} are loaded")
    return names


class DigestCache:
    """sha256 digests of files, by real path and identity (size, mtime, ctime, inode, device).

    Read once, written back atomically (merged with what another daemon wrote meanwhile) when it
    learned something. Unreadable, corrupt or unwritable: the digests are computed, never trusted."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries = self._read() if path is not None else {}
        self._learned: dict[str, dict] = {}

    def _read(self) -> dict:
        """The cache's entries; none when it is missing, not a regular file (a FIFO is never waited
        on), writable by others than the daemon's user, too large, or not the JSON we write (of any
        depth: RecursionError too)."""
        try:
            data = json.loads(read_setting_file(self.path, CACHE_FILE_MAX_BYTES, private=True) or b"{}")
        except FileNotFoundError:
            return {}
        except (OSError, SettingFileError, ValueError, RecursionError) as exc:
            log.info("fingerprint cache %s ignored (%s); digests are recomputed", self.path, str(exc)[:120])
            return {}
        entries = data.get("files") if isinstance(data, dict) else None
        return {path: entry for path, entry in entries.items() if isinstance(entry, dict)} \
            if isinstance(entries, dict) else {}

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
        self.put_identity(real, self.identity(st), digest)

    def put_identity(self, real: str, identity, digest: str) -> None:
        self._learned[real] = {"id": list(identity), "sha256": digest}

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


def _hub_blob_name(path: str) -> str | None:
    """The sha256 that a hub blob's name claims: the hub stores LFS files (the weights) as
    `blobs/<sha256>`. A claim only: it is checked against the content, never trusted."""
    path = Path(path)
    return path.name if path.parent.name == "blobs" and _SHA256_NAME.fullmatch(path.name) else None


def _blob_claims(path: Path) -> set[str]:
    """What every blob name along `path`'s chain of links claims (a link to a blob that is itself a
    link claims as much as the blob it ends at), and the final file's name."""
    claims, current = set(), str(path)
    for _ in range(40):  # the kernel's own limit on links followed
        claims.add(_hub_blob_name(current))
        if not os.path.islink(current):
            break
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    claims.add(_hub_blob_name(os.path.realpath(path)))
    return claims - {None}


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
    try:
        f = open_regular(path)
    except SettingFileError as exc:
        raise ModelLoadError(f"cannot fingerprint {exc}") from None
    with f:
        before = os.fstat(f.fileno())
        digest = _sha256(f)
        after = os.fstat(f.fileno())
    if DigestCache.identity(before) != DigestCache.identity(after):
        raise ModelLoadError(f"{path} changed while it was being fingerprinted; start again once it is written")
    return digest, before


def file_digest(path: Path, cache: DigestCache, defer: bool = False) -> tuple[str | None, int, int, Identity]:
    """(sha256, size, bytes hashed now, identity) of one model file; with `defer`, a digest the
    cache does not know is left to the load, which hashes the bytes as it reads them (None)."""
    real, st = os.path.realpath(path), os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{path} is not a regular file")
    digest, hashed = cache.get(real, st), 0
    if digest is None and defer:
        return None, st.st_size, 0, (real, tuple(DigestCache.identity(st)))
    if digest is None:
        digest, st = _hash_file(path)
        _check_blob_name(path, real, digest)
        cache.put(real, st, digest)
        hashed = st.st_size
    return digest, st.st_size, hashed, (real, tuple(DigestCache.identity(st)))


def _check_blob_name(path: Path, real: str, digest: str) -> None:
    wrong = sorted(_blob_claims(path) - {digest})
    if wrong:
        raise ModelLoadError(f"{path} links to a hub blob named {wrong[0]}, but its content ({real}) has sha256 "
                             f"{digest}, not the one its name says: the blob is corrupt or was edited; delete it "
                             "and download it again")


def fingerprint_directory(directory: Path, cache: DigestCache, defer: frozenset[str] = frozenset()) -> Fingerprint:
    """The fingerprint of the model files in `directory`: sha256 over their names and digests.
    `defer`: names of weight files the load will read; those the cache does not know are not read
    here, and the Fingerprint is `pending` until `completed` with the digests the load computed
    as it read them (a first start reads each file once)."""
    began = time.monotonic()
    files = model_files(directory)
    if not any(name.endswith(WEIGHTS_SUFFIX) for name in files):
        raise ModelLoadError(f"cannot fingerprint {directory}: it holds no *.safetensors weights")
    total, hashed, identities, digests = 0, 0, [], []
    for name, path in files.items():
        try:
            digest, size, read, identity = file_digest(path, cache, name in defer)
        except OSError as exc:
            raise ModelLoadError(f"cannot fingerprint {path}: {exc.strerror or exc}") from None
        total, hashed = total + size, hashed + read
        identities.append((name, identity))
        digests.append((name, digest))
    cache.save()
    pending = tuple(name for name, digest in digests if digest is None)
    return Fingerprint("" if pending else _manifest(digests), len(files), total, hashed, time.monotonic() - began,
                       directory, tuple(identities), tuple(digests), pending)


def _manifest(digests) -> str:
    manifest = hashlib.sha256()
    for name, digest in digests:
        manifest.update(f"{name}\t{digest}\n".encode())
    return manifest.hexdigest()[:FINGERPRINT_HEX]


def weights_fingerprint(files: str, fmt: str) -> str:
    """The model's fingerprint: its files' (`files`) as it is unquantized, whatever the dtype (bf16
    and float32 are the same weights at two precisions); in a quantized format, one of its own, so
    that vectors of int8 and of unquantized weights can never pass for each other."""
    from daemon.loading.weights import NONE, RECIPES, parse_format

    fmt = parse_format(fmt)
    if fmt == NONE:
        return files
    return hashlib.sha256(f"{files}\tweights\t{RECIPES[fmt]}\n".encode()).hexdigest()[:FINGERPRINT_HEX]
