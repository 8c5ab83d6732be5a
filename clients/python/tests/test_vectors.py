"""Embeddings off the wire: lists of rows without numpy, arrays with it, the same values either way."""

from __future__ import annotations

import struct
import sys

import pytest

from qwen3vl_client.protocol import EmbedReply, as_lists, encode_rows, pack, unpack

ROWS = {"float32": [[0.5, -1.25, 3.0, 0.0, 0.375, -2.5, 7.0, 0.125]],
        "list": [[0.5, -1.25], [3.0, 0.0]],
        "int8": [[-128, -1, 0, 1, 127, 5, -5, 64]],
        "uint8": [[0, 1, 128, 255, 7, 9, 200, 3]],
        "binary": [[-128, 127]],  # 16 dimensions, packed
        "ubinary": [[0, 255], [1, 128]]}
DIMENSIONS = {"float32": 8, "list": 2, "int8": 8, "uint8": 8, "binary": 16, "ubinary": 16}


@pytest.fixture
def without_numpy(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)  # `import numpy` fails, as where it is not installed


def wire(encoding: str, rows: list) -> dict:
    body = {"embeddings": encode_rows(rows, encoding), "count": len(rows), "dimension": DIMENSIONS[encoding],
            "encoding": encoding, "model": "m", "tokens": 3, "fingerprint": "f"}
    return unpack(pack(body))


@pytest.mark.parametrize("encoding", ROWS)
def test_without_numpy_each_encoding_decodes_to_lists_of_rows(without_numpy, encoding):
    reply = EmbedReply.from_wire(wire(encoding, ROWS[encoding]))
    assert reply.embeddings == ROWS[encoding] and reply.count == len(ROWS[encoding])
    assert all(type(v) is (float if encoding in ("float32", "list") else int)
               for row in reply.embeddings for v in row)


def test_float32_rows_are_little_endian_float32_on_the_wire(without_numpy):
    body = wire("float32", [[1.0, -2.0]])
    assert body["embeddings"] == struct.pack("<2f", 1.0, -2.0)
    assert EmbedReply.from_wire({**body, "dimension": 2}).embeddings == [[1.0, -2.0]]


def test_a_float_is_rounded_to_float32_as_the_daemon_sends_it(without_numpy):
    (row,) = EmbedReply.from_wire(wire("list", [[0.1, 0.2]])).embeddings
    assert row == [struct.unpack("<f", struct.pack("<f", v))[0] for v in (0.1, 0.2)]


@pytest.mark.parametrize("size", [0, 4, 36])
def test_rows_that_do_not_fill_count_times_dimension_are_refused(without_numpy, size):
    body = {"embeddings": bytes(size), "count": 1, "dimension": 8, "model": "m", "tokens": 1}
    with pytest.raises(ValueError):
        EmbedReply.from_wire(body)


@pytest.mark.parametrize("encoding", ROWS)
def test_with_numpy_the_same_rows_come_as_an_array(encoding):
    np = pytest.importorskip("numpy")
    reply = EmbedReply.from_wire(wire(encoding, ROWS[encoding]))
    assert isinstance(reply.embeddings, np.ndarray) and reply.count == len(ROWS[encoding])
    assert as_lists(reply.embeddings) == ROWS[encoding]


def test_a_reply_encodes_back_to_the_bytes_it_came_from(without_numpy):
    body = wire("int8", ROWS["int8"])
    assert EmbedReply.from_wire(body).to_wire()["embeddings"] == body["embeddings"]
