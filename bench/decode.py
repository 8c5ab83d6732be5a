"""What the payload limits cost on the socket thread: `decode_payload` (msgpack with container limits,
then the nesting check) against a plain `msgpack.unpackb` of the same bytes.

    .venv/bin/python -m bench.decode

Best of 5 repeats; prints microseconds per payload and the ratio.
"""

from __future__ import annotations

import timeit

import msgpack

from qwen3vl_client.limits import Limits
from qwen3vl_client.protocol import decode_payload

PAYLOADS = {
    "health": {"op": "health", "id": 1},
    "embed, one text": {"op": "embed", "id": 1, "inputs": ["the quick brown fox"]},
    "embed, 1024 texts": {"op": "embed", "id": 1, "inputs": ["the quick brown fox"] * 1024},
    "embed, 1024 input maps": {"op": "embed", "id": 1, "inputs": [{"text": "x", "image": b"png"}] * 1024},
}


def best(call, number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number


def main() -> None:
    limits = Limits()
    print(f"{'payload':<24}{'decode_payload us':>19}{'unpackb us':>12}{'ratio':>8}")
    for name, obj in PAYLOADS.items():
        data = msgpack.packb(obj, use_bin_type=True)
        number = 20000 if len(data) < 1000 else 200
        ours = best(lambda: decode_payload(data, limits), number)
        plain = best(lambda: msgpack.unpackb(data, raw=False, strict_map_key=True), number)
        print(f"{name:<24}{ours * 1e6:19.2f}{plain * 1e6:12.2f}{ours / plain:8.2f}")


if __name__ == "__main__":
    main()
