"""What the socket fuzzers send and how they judge the answer; shared by the short run in the suite
(tests/test_faults.py) and the long run (`python -m bench.fuzz`).

Three kinds of case, all sent through a real DEALER socket:
- structure-aware payloads: maps with real and made-up ops and fields holding values of every shape;
- mutations of valid requests (bit flips, overwrites, inserted, deleted and duplicated spans,
  truncation), so that corrupt msgpack, corrupt images and corrupt videos all reach the daemon;
- payloads just over `max_message_bytes`.
Each is sent behind a random envelope (0-3 extra frames of 0-16 bytes, empty frames included).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from hypothesis import strategies as st

from bench.harness import png_bytes

# Codes a fuzzed request may get. `internal` (a fault inside the daemon) and `shutting_down` may not.
EXPECTED_ERRORS = frozenset({"invalid_request", "unsupported", "input_error", "too_large", "not_loaded", "overloaded",
                             "model_mismatch"})


def seed_requests() -> list[dict]:
    """Valid requests of every op and input kind: what the mutations start from."""
    red, blue = png_bytes((200, 20, 20), (40, 32)), png_bytes((20, 20, 200), (40, 32))
    return [
        {"op": "health", "id": 1},
        {"op": "metrics", "id": "m"},
        {"op": "embed", "id": 2, "inputs": ["a short text", "another one"]},
        {"op": "embed", "id": 3, "inputs": [{"text": "caption", "image": red}], "dimension": 16, "normalize": False},
        {"op": "embed", "id": 4, "inputs": [{"video": [red, blue, red]}], "instruction": "Find the clip",
         "encoding": "list"},
        {"op": "rerank", "id": 5, "query": "which is red?", "documents": ["red", {"image": red}, {"image": blue}]},
        {"op": "rerank", "id": 6, "query": {"image": red}, "documents": ["a", "b"], "instruction": "Match."},
        {"op": "embed", "id": 7, "inputs": ["int8 please", "and me"], "encoding": "int8", "dimension": 32},
        {"op": "embed", "id": 8, "inputs": ["bits"], "encoding": "ubinary", "expect_fingerprint": "0" * 20},
        {"op": "rerank", "id": 9, "query": "q", "documents": ["a", "b", "c"], "top_n": 2},
    ]


SEEDS = [msgpack.packb(r, use_bin_type=True) for r in seed_requests()]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
fields = st.sampled_from(["inputs", "query", "documents", "instruction", "dimension", "normalize", "encoding", "id",
                          "text", "image", "video", "fps", "max_frames", "top_n", "expect_fingerprint"])
requests = st.builds(lambda op, extra: {"op": op, **extra},
                     st.one_of(st.sampled_from(["embed", "rerank", "health", "metrics"]), values),
                     st.dictionaries(fields, values, max_size=4))


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply edits (kind, position, bytes) to data; positions wrap around its length."""
    buf = bytearray(data)
    for kind, pos, chunk in edits:
        pos = pos % (len(buf) + 1)
        if kind == 0 and buf:  # flip one bit
            buf[pos % len(buf)] ^= 1 << (chunk[0] % 8)
        elif kind == 1:  # overwrite
            buf[pos:pos + len(chunk)] = chunk
        elif kind == 2:  # insert
            buf[pos:pos] = chunk
        elif kind == 3:  # delete a span
            del buf[pos:pos + chunk[0] % 32 + 1]
        elif kind == 4:  # duplicate a span
            buf[pos:pos] = buf[pos:pos + chunk[0] % 64 + 1]
        else:  # truncate
            del buf[pos:]
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
                 min_size=1, max_size=4)
mutations = st.builds(mutate, st.sampled_from(SEEDS), edits)


def oversized(max_message_bytes: int):
    return st.integers(1, 4096).map(lambda extra: b"\x00" * (max_message_bytes + extra))


def payloads(max_message_bytes: int | None = None):
    kinds = [requests.map(lambda r: msgpack.packb(r, use_bin_type=True)),
             values.map(lambda v: msgpack.packb(v, use_bin_type=True)), st.binary(max_size=64), mutations]
    if max_message_bytes is not None:
        kinds.append(oversized(max_message_bytes))
    return st.one_of(*kinds)


envelopes = st.lists(st.binary(max_size=16), max_size=3)


@dataclass
class Verdict:
    """How the daemon answered one case: `outcome` is "ok" or the error code; `problem` is set when
    the answer broke a rule (wrong envelope, not a map, a code a client's input cannot cause)."""

    outcome: str
    problem: str | None = None


def judge(sent_envelope: list[bytes], frames: list[bytes]) -> Verdict:
    if frames[:-1] != sent_envelope:
        return Verdict("?", f"envelope not echoed: sent {sent_envelope!r}, got {frames[:-1]!r}")
    try:
        reply = msgpack.unpackb(frames[-1], raw=False)
    except Exception as exc:
        return Verdict("?", f"reply is not msgpack ({exc})")
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return Verdict("?", f"reply is not a map with ok: {reply!r:.200}")
    if reply["ok"]:
        return Verdict("ok")
    code = reply.get("error", {}).get("code")
    if code not in EXPECTED_ERRORS:
        return Verdict(str(code), f"unexpected error: {reply['error']!r:.300}")
    return Verdict(code)
