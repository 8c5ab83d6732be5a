"""One batch of rows through an embed call: the vectors of the rows that embed, an error record for
each row that cannot, and the errors that call for a retry (the daemon is busy, restarting or out
of reach) or stop the job (another model, a setting the daemon refuses).

A request fails whole when one of its inputs is bad, and the daemon's message names that input
(`inputs[3].image[0]: ...`): that row gets the error and the others are sent again. An error that
names no input is narrowed down by halving the batch; an input refused on its own is that row's.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np

from daemon.dataset.rows import Row
from daemon.dataset.store import ErrorRecord
from qwen3vl_client.client import DaemonTimeout, DaemonUnavailable
from qwen3vl_client.errors import ErrorCode
from qwen3vl_client.fields import BATCH
from qwen3vl_client.protocol import EmbedReply, embed_request

# Worth retrying: the daemon will take the request later (or another daemon will).
TRANSIENT = frozenset(c.value for c in (ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN, ErrorCode.NOT_LOADED,
                                        ErrorCode.DEADLINE_EXCEEDED))
# A row's own fault when the request held that row alone (or the message names it).
ROW_CODES = frozenset(c.value for c in (ErrorCode.INVALID_REQUEST, ErrorCode.INPUT_ERROR, ErrorCode.TOO_LARGE,
                                        ErrorCode.INTERNAL))
SPLIT_CODES = frozenset(c.value for c in (ErrorCode.INPUT_ERROR, ErrorCode.TOO_LARGE, ErrorCode.INTERNAL))
DUPLICATE_ID = "duplicate_id"  # errors.jsonl's own code: a row whose id an earlier row already had
INPUT_INDEX = re.compile(r"inputs\[(\d+)\]")


class JobFailed(Exception):
    """The job cannot go on (another model, a refused setting, no daemon for too long): one line."""


class Transient(Exception):
    """The daemon could not take the batch now; the same batch may be sent again."""


@dataclass(frozen=True)
class EmbedSettings:
    """The embed request's fields, the same for every batch of a job."""

    instruction: str | None = None
    dimension: int | None = None
    normalize: bool = True
    encoding: str = "float32"
    expect_fingerprint: str | None = None
    model: str | None = None
    # A job is bulk work: a search made meanwhile goes first, even in the middle of the job's forward.
    priority: str = BATCH

    def payload(self, inputs: list) -> dict:
        return embed_request(inputs, self.instruction, self.dimension, self.normalize, self.encoding,
                             self.expect_fingerprint, self.model, self.priority)


@dataclass(frozen=True)
class MadeBy:
    """What made a reply's vectors, from the reply itself."""

    fingerprint: str | None
    model: str
    dimension: int
    quantization: str | None


@dataclass
class BatchOutcome:
    ids: list = field(default_factory=list)
    vectors: list[bytes] = field(default_factory=list)  # each row's encoded vector
    errors: list[ErrorRecord] = field(default_factory=list)
    made_by: MadeBy | None = None

    def add(self, rows: list[Row], reply: dict) -> None:
        made_by = MadeBy(reply.get("fingerprint"), str(reply.get("model")), int(reply["dimension"]),
                         reply.get("quantization"))
        if self.made_by is not None and made_by != self.made_by:
            raise JobFailed(f"the daemons answered with different models or settings: {self.made_by} and {made_by}")
        self.made_by = made_by
        matrix = encoded_rows(reply)
        if len(matrix) != len(rows):
            raise JobFailed(f"the daemon sent {len(matrix)} vectors for {len(rows)} inputs")
        self.ids.extend(row.id for row in rows)
        self.vectors.extend(matrix)


def encoded_rows(reply: dict) -> list[bytes]:
    """Each row of a reply's embeddings as the bytes of its encoding (float32: little-endian)."""
    vectors = np.ascontiguousarray(EmbedReply.from_wire(reply).embeddings)
    return [row.tobytes() for row in vectors]


Call = Callable[[dict], dict]  # an embed payload to the daemon's reply map


def row_error(row: Row, code: str, message: str) -> ErrorRecord:
    return ErrorRecord(row.index, row.id, code, message)


def embed_batch(call: Call, rows: list[Row], settings: EmbedSettings) -> BatchOutcome:
    outcome = BatchOutcome()
    groups = [rows]
    while groups:
        group = groups.pop()
        try:
            reply = call(settings.payload([row.input for row in group]))
        except (DaemonTimeout, DaemonUnavailable) as exc:
            raise Transient(str(exc)) from None
        if reply.get("ok"):
            outcome.add(group, reply)
            continue
        error = reply.get("error") or {}
        code, message = str(error.get("code")), str(error.get("message"))
        if code in TRANSIENT:
            raise Transient(f"{code}: {message}")
        named = INPUT_INDEX.match(message)
        if named and int(named.group(1)) < len(group) and code in ROW_CODES:
            bad = int(named.group(1))
            outcome.errors.append(row_error(group[bad], code, "input" + message[named.end():]))
            groups.append(group[:bad] + group[bad + 1:])
        elif len(group) > 1 and code in SPLIT_CODES:
            half = len(group) // 2
            groups += [group[half:], group[:half]]
        elif len(group) == 1 and code in SPLIT_CODES:
            outcome.errors.append(row_error(group[0], code, message))
        else:
            raise JobFailed(f"{code}: {message}")
        groups = [g for g in groups if g]
    return outcome


T = TypeVar("T")
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 5.0


def with_retries(attempt: Callable[[], T], give_up_after_s: float, stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic) -> T:
    """attempt() until it is not Transient, backing off (0.1 s doubling to 5 s); JobFailed after
    `give_up_after_s`, or at once when `stop` is set."""
    started, delay = clock(), RETRY_FIRST_S
    while True:
        try:
            return attempt()
        except Transient as exc:
            if clock() - started + delay > give_up_after_s:
                raise JobFailed(f"{exc} (still so after {give_up_after_s:g} s of retries)") from None
            if stop.wait(delay):
                raise JobFailed("stopped") from None
            delay = min(delay * 2, RETRY_MAX_S)

