"""INPUT: a JSONL file (one JSON object a line) or a Parquet file, each row an id and an input.

A row's input is its `input` column (a whole protocol input object, or a string), else made of its
`text`, `image` and `video` columns. Media values become the protocol's media objects: bytes as they
are (Parquet), a string as {"url"} when it is http(s), else {"path"} (read by the daemon under its
own path policy); in JSON, {"data": BASE64} carries bytes. A row that cannot be read (not JSON, no
id, no input) is still a Row, with the error that it gets in errors.jsonl.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from qwen3vl_client.protocol import pack

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
PARQUET_MAGIC = b"PAR1"
READ_BATCH_ROWS = 1024  # Parquet rows decoded at a time
SNIFF_ROWS = 100  # JSONL rows looked at for the columns before the job starts


class InputError(ValueError):
    """INPUT cannot be this job's (none of its rows has the columns named): one line."""


@dataclass(frozen=True)
class Columns:
    id: str = "id"
    text: str = "text"
    image: str = "image"
    video: str = "video"
    input: str = "input"

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass(frozen=True)
class Row:
    index: int  # its place in INPUT, from 0 (JSONL: its line, counting blank ones)
    id: Any = None  # int or str; None when it has none
    input: Any = None  # the wire input object; None when `error` says why there is none
    error: str | None = None
    size: int = 0  # the input's bytes in a request (msgpack)


@dataclass(frozen=True)
class Chunk:
    """A run of INPUT's rows that one reader can read alone (a Ray read task): JSONL from a byte
    offset, or a Parquet file's row groups."""

    first_row: int
    rows: int
    offset: int = 0  # JSONL
    row_groups: tuple[int, ...] = ()  # Parquet


def input_format(path: Path) -> str:
    """'parquet' when the file starts with Parquet's magic bytes, else 'jsonl'."""
    with open(path, "rb") as f:
        return "parquet" if f.read(4) == PARQUET_MAGIC else "jsonl"


class InputFile:
    def __init__(self, path: Path, columns: Columns = Columns()):
        self.path, self.columns = Path(path), columns
        self.format = input_format(self.path)

    def check_columns(self) -> None:
        """Refuse INPUT at once when none of its rows (JSONL: of the first SNIFF_ROWS) has the id
        column, or none has any input column: a misspelt --id-column or --text-column would else
        make every row an error."""
        c = self.columns
        found = self._column_names()
        if not found:
            return  # no rows: nothing to refuse
        every = sorted(set().union(*found))
        if not any(c.id in names for names in found):
            raise InputError(f"{self.path}: no row has the id column {c.id!r} (its columns: {', '.join(every)}); "
                             "give --id-column")
        wanted = (c.text, c.image, c.video, c.input)
        if not any(name in names for names in found for name in wanted):
            raise InputError(f"{self.path}: no row has any of the columns {', '.join(wanted)} (its columns: "
                             f"{', '.join(every)}); give --text-column, --image-column, --video-column or "
                             "--input-column")

    def _column_names(self) -> list[set]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return [set(pq.ParquetFile(self.path).schema_arrow.names)]
        found: list[set] = []
        for _, record in self._jsonl(None):
            if isinstance(record, dict):
                found.append(set(map(str, record)))
                if len(found) == SNIFF_ROWS:
                    break
        return found

    def count(self) -> int:
        """How many rows INPUT holds (JSONL: its non-blank lines)."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def chunks(self, rows_per_chunk: int) -> list[Chunk]:
        return self._parquet_chunks(rows_per_chunk) if self.format == "parquet" else self._jsonl_chunks(rows_per_chunk)

    def _jsonl_chunks(self, rows_per_chunk: int) -> list[Chunk]:
        chunks, first, offset, lines, position = [], 0, 0, 0, 0
        with open(self.path, "rb") as f:
            for line in f:
                position += len(line)
                lines += 1
                if lines == rows_per_chunk:
                    chunks.append(Chunk(first, lines, offset=offset))
                    first, offset, lines = first + lines, position, 0
        if lines:
            chunks.append(Chunk(first, lines, offset=offset))
        return chunks

    def _parquet_chunks(self, rows_per_chunk: int) -> list[Chunk]:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(self.path).metadata
        chunks, groups, first, rows = [], [], 0, 0
        for group in range(meta.num_row_groups):
            groups.append(group)
            rows += meta.row_group(group).num_rows
            if rows >= rows_per_chunk:
                chunks.append(Chunk(first, rows, row_groups=tuple(groups)))
                first, groups, rows = first + rows, [], 0
        if groups:
            chunks.append(Chunk(first, rows, row_groups=tuple(groups)))
        return chunks

    def rows(self, chunk: Chunk | None = None, inputs: bool = True) -> Iterator[Row]:
        """Every row of INPUT, or of one chunk, in order; without `inputs`, only their ids (Parquet
        then reads the id column alone)."""
        records = (self._parquet(chunk, inputs) if self.format == "parquet" else self._jsonl(chunk))
        for index, record in records:
            row = make_row(index, record, self.columns)
            yield row if inputs or row.id is None else Row(row.index, row.id)

    def _jsonl(self, chunk: Chunk | None) -> Iterator[tuple[int, Any]]:
        with open(self.path, "rb") as f:
            f.seek(chunk.offset if chunk else 0)
            for index, line in enumerate(f, chunk.first_row if chunk else 0):
                if chunk and index >= chunk.first_row + chunk.rows:
                    return
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    yield index, _Unreadable(f"not a JSON object: {str(exc)[:120]}")
                except RecursionError:
                    yield index, _Unreadable("not a JSON object this job can read: nested too deep")

    def _parquet(self, chunk: Chunk | None, inputs: bool = True) -> Iterator[tuple[int, Any]]:
        import pyarrow.parquet as pq

        source = pq.ParquetFile(self.path)
        c = self.columns
        wanted = [name for name in ((c.id, c.text, c.image, c.video, c.input) if inputs else (c.id,))
                  if name in source.schema_arrow.names]
        index = chunk.first_row if chunk else 0
        groups = list(chunk.row_groups) if chunk else None
        for batch in source.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=wanted):
            for record in batch.to_pylist():
                yield index, record
                index += 1


@dataclass(frozen=True)
class _Unreadable:
    why: str


def make_row(index: int, record: Any, columns: Columns) -> Row:
    if isinstance(record, _Unreadable):
        return Row(index, error=record.why)
    if not isinstance(record, dict):
        return Row(index, error=f"expected a JSON object, found {type(record).__name__}")
    row_id, why = check_id(record.get(columns.id), columns.id)
    if why:
        return Row(index, error=why)
    try:
        value = to_input(record, columns)
        return Row(index, row_id, value, size=wire_size(value))
    except ValueError as exc:
        return Row(index, row_id, error=str(exc))


def wire_size(value: Any) -> int:
    """The input's bytes in a request; ValueError when no request can carry it (a lone surrogate
    in a text, nesting past what msgpack packs)."""
    try:
        return len(pack(value))
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ValueError(f"input: cannot be sent: {str(exc)[:120]}") from None


def check_id(value: Any, column: str) -> tuple[Any, str | None]:
    """The id, or why it is not one: an integer within int64 or a non-empty string."""
    if value is None:
        return None, f"{column}: missing"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None, f"{column}: expected an integer or a string, found {type(value).__name__}"
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        return None, f"{column}: {value} does not fit in 64 bits"
    if isinstance(value, str) and not value:
        return None, f"{column}: empty"
    return value, None


def to_input(record: dict, columns: Columns) -> Any:
    """The row's wire input; ValueError names the column when there is none to embed."""
    whole = record.get(columns.input)
    if whole is not None:
        value = _input_object(whole, columns.input)
    else:
        value = {}
        if record.get(columns.text) is not None:
            value["text"] = record[columns.text]
        if record.get(columns.image) is not None:
            value["image"] = _media(record[columns.image], columns.image)
        if record.get(columns.video) is not None:
            value["video"] = _video(record[columns.video], columns.video)
        if not value:
            raise ValueError(f"no input: the row has none of {columns.text}, {columns.image}, {columns.video}, "
                             f"{columns.input}")
    _check_not_empty(value, columns.input if whole is not None else columns.text)
    return value


def _input_object(value: Any, column: str) -> Any:
    if isinstance(value, str):
        return {"text": value}
    if not isinstance(value, dict):
        raise ValueError(f"{column}: expected an input object or a string, found {type(value).__name__}")
    found = {k: v for k, v in value.items() if v is not None}  # Parquet structs hold every field, unset ones null
    if "image" in found:
        found["image"] = _media(found["image"], f"{column}.image")
    if "video" in found:
        found["video"] = _video(found["video"], f"{column}.video")
    return found


def _check_not_empty(value: Any, where: str) -> None:
    """An input of only empty texts embeds nothing: a row error, not a vector of the empty string."""
    if isinstance(value, dict) and value.get("image") is None and value.get("video") is None:
        texts = value.get("text")
        if texts is None or texts == []:
            raise ValueError(f"{where}: nothing to embed (no text, image or video)")
        texts = texts if isinstance(texts, list) else [texts]
        if all(isinstance(t, str) and not t.strip() for t in texts):
            raise ValueError(f"{where}: empty text")


def _media(value: Any, where: str) -> Any:
    """One image (or a list of them) as the protocol takes it."""
    if isinstance(value, list):
        return [_one_media(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return _one_media(value, where)


def _one_media(value: Any, where: str) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return {"url": value} if value.startswith(("http://", "https://")) else {"path": value}
    if isinstance(value, dict):
        found = {k: v for k, v in value.items() if v is not None}
        if isinstance(found.get("data"), str):  # JSON has no bytes: base64
            try:
                return {"data": base64.b64decode(found["data"], validate=True)}
            except (binascii.Error, ValueError):
                raise ValueError(f"{where}.data: not base64") from None
        return found
    raise ValueError(f"{where}: expected bytes, a path or URL string, or a media object")


def _video(value: Any, where: str) -> Any:
    """A video file (bytes, a path or URL string, an object) or a list of frames."""
    if isinstance(value, (bytes, bytearray)):
        return {"data": bytes(value)}
    if isinstance(value, list):
        return [_one_media(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return _one_media(value, where)
