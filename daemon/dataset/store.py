"""The output directory: a Parquet dataset committed part by part, its settings, and errors.jsonl.

A commit writes one part file whole under a hidden temporary name (readers skip names starting with
'.' or '_'), syncs it, appends the commit's failed rows to errors.jsonl and syncs that, then renames
the part into place: a kill at any moment leaves every committed id in exactly one part, and a
half-written part is never counted. The settings the vectors were made with are in _dataset.json
(written before the first part) and in every part's schema metadata. One job at a time holds the
directory (an flock on .lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from qwen3vl_client.fields import row_bytes

MANIFEST, ERRORS, LOCK = "_dataset.json", "errors.jsonl", ".lock"
PART_PREFIX, PART_SUFFIX, TEMP_PREFIX = "part-", ".parquet", ".tmp-"
META_PREFIX = "qwen3vl."
COMPARED = ("fingerprint", "dimension", "encoding", "normalize", "instruction", "quantization", "columns")


class StoreError(Exception):
    """The directory cannot take this job (held by another, other settings): one line."""


@dataclass(frozen=True)
class Settings:
    """What the vectors of a dataset were made with. A resume must match on COMPARED; the model's
    name is recorded but may differ (the same files under another name make the same vectors)."""

    fingerprint: str
    model: str
    dimension: int
    encoding: str
    normalize: bool
    instruction: str | None
    quantization: str | None  # int8/uint8: the daemon's map ("fixed" or "calibrated:<id>")
    id_type: str  # "int64" or "string"
    columns: str  # INPUT's columns the inputs came from: "id=id,text=text,image=image,video=video,input=input"

    def differences(self, other: "Settings") -> list[str]:
        return [f"{name} {getattr(self, name)!r} (this run: {getattr(other, name)!r})"
                for name in COMPARED if getattr(self, name) != getattr(other, name)]

    def metadata(self) -> dict[str, str]:
        """The schema metadata of every part: one key each, plain text (the instruction only when set)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["normalize"] = "true" if self.normalize else "false"
        return {META_PREFIX + k: str(v) for k, v in values.items() if v is not None}

    @property
    def vector_bytes(self) -> int:
        return row_bytes(self.encoding, self.dimension)


@dataclass(frozen=True)
class ErrorRecord:
    row: int
    id: Any
    code: str
    message: str


@dataclass(frozen=True)
class Existing:
    """What a directory already holds when a job starts."""

    settings: Settings | None
    ids: set  # committed ids
    failed: set  # (row, id) of the rows in errors.jsonl
    parts: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_whole(path: Path, data: bytes) -> None:
    temp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


class Store:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.settings: Settings | None = None
        self._lock_fd: int | None = None
        self._next_part = 0

    # -- opening ---------------------------------------------------------------------------------
    def lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.dir} is in use by another embed-dataset job") from None
        self._lock_fd = fd

    def open(self, overwrite: bool, retry_errors: bool) -> Existing:
        """Clear what a killed job left half-done (temporary files, a torn last error line), or
        everything with `overwrite`; then read what is committed."""
        for leftover in self.dir.glob(TEMP_PREFIX + "*"):
            leftover.unlink()
        if overwrite:
            for path in [*self._parts(), self.dir / MANIFEST, self.dir / ERRORS]:
                path.unlink(missing_ok=True)
            _fsync_dir(self.dir)
        self._repair_errors()
        if retry_errors:
            (self.dir / ERRORS).unlink(missing_ok=True)
        (self.dir / ERRORS).touch()  # there, empty, when no row failed
        self.settings = self._read_settings()
        parts = self._parts()
        self._next_part = 1 + max((self._part_number(p) for p in parts), default=-1)
        return Existing(self.settings, self._committed_ids(parts), self._failed(), len(parts))

    def _parts(self) -> list[Path]:
        return sorted(self.dir.glob(f"{PART_PREFIX}*{PART_SUFFIX}"))

    @staticmethod
    def _part_number(path: Path) -> int:
        try:
            return int(path.name[len(PART_PREFIX):].split("-", 1)[0])
        except ValueError:
            return -1

    def _read_settings(self) -> Settings | None:
        path = self.dir / MANIFEST
        if not path.exists():
            if self._parts():
                raise StoreError(f"{self.dir} holds parts but no {MANIFEST}: not a dataset this job wrote "
                                 "(give --overwrite to replace it)")
            return None
        try:
            return Settings(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{path}: unreadable ({exc}); give --overwrite to start again") from None

    def _committed_ids(self, parts: list[Path]) -> set:
        import pyarrow.parquet as pq

        ids: set = set()
        for part in parts:
            ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        return ids

    def _repair_errors(self) -> None:
        """Drop a last line that a kill cut short (every whole line ends with a newline)."""
        path = self.dir / ERRORS
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                os.fsync(f.fileno())

    def _failed(self) -> set:
        path = self.dir / ERRORS
        if not path.exists():
            return set()
        failed = set()
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            failed.add((record["row"], record["id"]))
        return failed

    def start(self, settings: Settings) -> None:
        """Record the settings (before the first part), or check them against those recorded."""
        if self.settings is not None:
            differences = self.settings.differences(settings)
            if differences:
                raise StoreError(f"{self.dir} was made with other settings: {'; '.join(differences)}")
            return
        _write_whole(self.dir / MANIFEST, json.dumps(asdict(settings), indent=1).encode())
        self.settings = settings

    # -- committing ------------------------------------------------------------------------------
    def commit(self, ids: list, vectors: list[bytes], errors: list[ErrorRecord]) -> None:
        """Make these rows and errors part of the dataset, atomically as the module says."""
        part = None
        if ids:
            part = self.dir / f"{PART_PREFIX}{self._next_part:06d}-{uuid.uuid4().hex[:8]}{PART_SUFFIX}"
            self._next_part += 1
            temp = self.dir / f"{TEMP_PREFIX}{part.name}"
            self._write_part(temp, ids, vectors)
        if errors:
            self._append_errors(errors)
        if part is not None:
            os.replace(temp, part)
            _fsync_dir(self.dir)

    def _write_part(self, path: Path, ids: list, vectors: list[bytes]) -> None:
        import pyarrow.parquet as pq

        table = part_table(self.settings, ids, vectors)
        with open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())

    def _append_errors(self, errors: list[ErrorRecord]) -> None:
        lines = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in errors)
        with open(self.dir / ERRORS, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def part_table(settings: Settings, ids: list, vectors: list[bytes]):
    """`id` (int64 or string) and `embedding`: float32 as a fixed-size list of `dimension` floats,
    compact encodings as fixed-size binary of the encoded row."""
    import numpy as np
    import pyarrow as pa

    id_array = pa.array(ids, type=pa.int64() if settings.id_type == "int64" else pa.string())
    if settings.encoding == "float32":
        flat = pa.array(np.frombuffer(b"".join(vectors), dtype="<f4"))
        embedding = pa.FixedSizeListArray.from_arrays(flat, settings.dimension)
    else:
        embedding = pa.array(vectors, type=pa.binary(settings.vector_bytes))
    schema = pa.schema([pa.field("id", id_array.type, nullable=False), pa.field("embedding", embedding.type,
                                                                                 nullable=False)],
                       metadata=settings.metadata())
    return pa.Table.from_arrays([id_array, embedding], schema=schema)
