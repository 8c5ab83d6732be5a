"""`qwen3vl-daemon calibrate`: int8/uint8 ranges from a sample of the operator's own inputs.

The sample is embedded by the running daemon (so by exactly the model it serves, pinned by its
fingerprint for the whole run), as raw full-size vectors; for each output dimension the vectors are
cut and normalised as the daemon returns them, and each component's least and greatest value kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.outputs.encodings import Calibration
from qwen3vl_client.client import Client, DaemonError

MIN_SAMPLES = 2
RECOMMENDED_SAMPLES = 1000
_INPUT_INDEX = re.compile(r"inputs\[(\d+)\]")  # how the daemon names an input in its errors


@dataclass(frozen=True)
class Sample:
    """The inputs of a sample file, each with the line it came from (errors name the line)."""

    path: Path
    inputs: list
    lines: list[int]

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"


def read_sample(path: Path) -> Sample:
    """One input per non-empty line: a JSON object is a protocol input (text, image, video), any
    other line is a text. A line that is not UTF-8, or not a JSON object though it starts with '{'
    (nested past the parser's depth included), is a ValueError naming the file and the line."""
    inputs, lines = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                inputs.append(json.loads(line))
            except (ValueError, RecursionError):
                raise ValueError(f"{path}:{number}: a line starting with '{{' must be a JSON input object") from None
        else:
            inputs.append(line)
        lines.append(number)
    if len(inputs) < MIN_SAMPLES:
        raise ValueError(f"{path}: {len(inputs)} inputs; calibration needs at least {MIN_SAMPLES}")
    return Sample(path, inputs, lines)


def default_dimensions(full: int, default: int | None) -> list[int]:
    """The full size, the daemon's default, and the Matryoshka powers of two from 32 below them."""
    dims = {full, default or full}
    size = 32
    while size < full:
        dims.add(size)
        size *= 2
    return sorted(dims)


def calibrate(client: Client, sample: Sample, dimensions: list[int] | None, instruction: str | None,
              batch: int = 64) -> Calibration:
    health = client.health()["embedding"]
    fingerprint, full = health.get("fingerprint"), health.get("max_dimension")
    if not health.get("loaded") or not fingerprint or not full:
        raise ValueError("the daemon's embedding model is not loaded (see `qwen3vl-daemon health`)")
    dims = dimensions or default_dimensions(full, health.get("dimension"))
    wrong = [d for d in dims if not 1 <= d <= full]
    if wrong:
        raise ValueError(f"--dimension {wrong[0]} is outside 1..{full}")
    raw = [_embed(client, sample, start, start + batch, instruction, full, fingerprint)
           for start in range(0, len(sample.inputs), batch)]
    return Calibration.compute(np.concatenate(raw), dims, fingerprint, health.get("name") or "")


def _embed(client: Client, sample: Sample, start: int, end: int, instruction: str | None, full: int,
           fingerprint: str) -> np.ndarray:
    """Raw vectors of sample.inputs[start:end]; an input the daemon refuses is named by its line."""
    try:
        return client.embed(sample.inputs[start:end], instruction, full, normalize=False,
                            expect_fingerprint=fingerprint).embeddings
    except DaemonError as exc:
        found = _INPUT_INDEX.match(exc.message)
        if found is None:
            raise
        raise ValueError(f"{sample.where(start + int(found.group(1)))}: {exc.code}: "
                         f"{exc.message[found.end():].lstrip('.: ')}") from None
