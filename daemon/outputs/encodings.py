"""Compact embeddings: int8, uint8, binary and ubinary, each a function of one vector alone.

- `ubinary`: the sign bits, `np.packbits(x > 0)` per row (first component in the first byte's most
  significant bit), dimension/8 bytes; `binary`: the same bytes minus 128, as int8. These are
  sentence-transformers' conventions, so existing tools read them.
- `uint8` / `int8`: each component through a fixed affine map per dimension index,
  `u = clip(round((x - start) / step), 0, 255)` (round half to even), `int8 = u - 128`; dequantised,
  `x ~ start + u * step`, within step/2 for a component inside the range. The map never depends on
  the other vectors of a batch (sentence-transformers' default takes it from the batch, so the same
  input would quantize differently with different neighbours). It comes from the operator's
  calibration file (`qwen3vl-daemon calibrate`: per dimension index, the least and greatest value
  over a sample of the operator's inputs, one map per output dimension), or, without one, a fixed scale
  for unit vectors: `int8 = clip(round(x * 127 * sqrt(d) / 16), -128, 127)` (components within
  +-16/sqrt(d), 16 times a random unit vector's spread, are kept; the step is 16/(127 sqrt(d))).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.inputs.files import SettingFileError, read_setting_file
from qwen3vl_client.fields import PACKED, SCALED

FIXED_SPREAD = 16.0  # the fixed map's range, in units of 1/sqrt(d) (a random unit vector's spread)
MIN_STEP = 1e-9  # a calibrated dimension that never varied in the sample still gets a usable step
CALIBRATION_FORMAT = "qwen3vl-int8-calibration"
CALIBRATION_MAX_BYTES = 256 << 20
UNIT_BOUND = 1.0 + 1e-6  # |component| of an L2-normalised float32 vector, with float rounding


@dataclass(frozen=True)
class Scale:
    """The per-dimension map of int8/uint8 for one output dimension."""

    start: np.ndarray  # float64, (d,)
    step: np.ndarray  # float64, (d,), > 0
    label: str  # "fixed", or "calibrated:<id>": names the map in replies and health

    @classmethod
    def fixed(cls, dimension: int) -> "Scale":
        step = FIXED_SPREAD / (127.0 * math.sqrt(dimension))
        return cls(np.full(dimension, -128.0 * step), np.full(dimension, step), "fixed")

    @classmethod
    def from_range(cls, low: np.ndarray, high: np.ndarray, label: str) -> "Scale":
        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        return cls(low, np.maximum((high - low) / 255.0, MIN_STEP), label)


def quantize(vectors: np.ndarray, encoding: str, scale: Scale | None = None) -> np.ndarray:
    """`vectors` (n, d) float32 as `encoding`: (n, d) int8/uint8, or (n, d/8) int8/uint8 packed bits."""
    if encoding in PACKED:
        bits = np.packbits(vectors > 0, axis=1)
        return bits if encoding == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    if encoding in SCALED:
        units = np.clip(np.rint((vectors.astype(np.float64) - scale.start) / scale.step), 0, 255).astype(np.uint8)
        return units if encoding == "uint8" else (units.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"not a compact encoding: {encoding}")


def dequantize(codes: np.ndarray, encoding: str, scale: Scale) -> np.ndarray:
    """The float32 vectors int8/uint8 `codes` stand for."""
    units = codes.astype(np.float64) + (128.0 if encoding == "int8" else 0.0)
    return (scale.start + units * scale.step).astype(np.float32)


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Calibration:
    """Per output dimension, the least and greatest component values over a sample of inputs."""

    fingerprint: str  # the embedding model's the sample was embedded with
    model: str
    samples: int
    ranges: dict[int, tuple[np.ndarray, np.ndarray]]  # dimension -> (low, high)
    id: str  # a digest of the ranges: names this calibration in replies

    @classmethod
    def compute(cls, raw: np.ndarray, dimensions: list[int], fingerprint: str, model: str) -> "Calibration":
        """From the raw pooled vectors (n, full) of a sample: each dimension's ranges of the vectors as
        the daemon returns them (cut to the dimension, then L2-normalised)."""
        from daemon.models import cut_and_normalize

        ranges = {}
        for d in sorted(set(dimensions)):
            cut = cut_and_normalize(raw, d, True)
            ranges[d] = (cut.min(axis=0).astype(np.float64), cut.max(axis=0).astype(np.float64))
        return cls(fingerprint, model, int(raw.shape[0]), ranges, _ranges_id(ranges))

    @property
    def label(self) -> str:
        return f"calibrated:{self.id}"

    def scale(self, dimension: int) -> Scale | None:
        found = self.ranges.get(dimension)
        return Scale.from_range(*found, self.label) if found else None

    def to_json(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "version": 1, "model": self.model, "fingerprint": self.fingerprint,
                "samples": self.samples,
                "ranges": {str(d): {"min": low.tolist(), "max": high.tolist()} for d, (low, high) in self.ranges.items()}}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path, hidden_size: int | None = None) -> "Calibration":
        """The calibration in `path`, checked whole (CalibrationError names what is wrong); with
        `hidden_size`, every dimension must be one the model can return."""
        try:
            data = json.loads(read_setting_file(path, CALIBRATION_MAX_BYTES))
        except (OSError, SettingFileError) as exc:
            raise CalibrationError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
        except (ValueError, RecursionError):  # not JSON, or JSON nested past the parser's depth
            raise CalibrationError(f"{path}: not JSON (write it with `qwen3vl-daemon calibrate`)") from None
        return cls.from_json(data, str(path), hidden_size)

    @classmethod
    def from_json(cls, data: object, where: str, hidden_size: int | None = None) -> "Calibration":
        version = data.get("version") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT or type(version) is not int \
                or version != 1:
            raise CalibrationError(f"{where}: not a version 1 {CALIBRATION_FORMAT} file")
        fingerprint, ranges, samples = data.get("fingerprint"), data.get("ranges"), data.get("samples", 0)
        if not isinstance(fingerprint, str) or not isinstance(ranges, dict) or not ranges:
            raise CalibrationError(f"{where}: needs 'fingerprint' (a string) and 'ranges' (per dimension)")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise CalibrationError(f"{where}: 'samples' must be a whole number of inputs, not {_shown(samples)}")
        model = data.get("model", "")
        if not isinstance(model, str):
            raise CalibrationError(f"{where}: 'model' must be a string, not {_shown(model)}")
        parsed = {}
        for key, value in ranges.items():
            dimension = _dimension_key(key, where, hidden_size)
            parsed[dimension] = _range(value, dimension, f"{where}: ranges[{key}]")
        return cls(fingerprint, model, samples, parsed, _ranges_id(parsed))


def _shown(value: object) -> str:
    return type(value).__name__ if isinstance(value, (dict, list)) else repr(value)[:40]


def _dimension_key(key: str, where: str, hidden_size: int | None) -> int:
    """A dimension as `calibrate` writes it: decimal digits with no sign, no leading zero, no space."""
    if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9 and str(int(key)) == key
            and int(key) > 0):
        raise CalibrationError(f"{where}: ranges key {key[:40]!r} is not a dimension (a positive whole number "
                               "written without leading zeros)")
    if hidden_size is not None and int(key) > hidden_size:
        raise CalibrationError(f"{where}: ranges for dimension {key}, but the embedding model returns at most "
                               f"{hidden_size}; was the file made for another model?")
    return int(key)


def _range(value: object, dimension: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    bounds = [value.get(name) for name in ("min", "max")] if isinstance(value, dict) else None
    if bounds is None or not all(isinstance(b, list) for b in bounds):
        raise CalibrationError(f"{where}: expected {{'min': [numbers], 'max': [numbers]}}")
    if not all(len(b) == dimension for b in bounds):
        raise CalibrationError(f"{where}: 'min' and 'max' need {dimension} numbers each")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for b in bounds for x in b):
        raise CalibrationError(f"{where}: 'min' and 'max' must hold numbers only")
    try:
        low, high = (np.asarray(b, dtype=np.float64) for b in bounds)
    except OverflowError:  # an integer past float64's range
        raise CalibrationError(f"{where}: values must be finite, with min <= max") from None
    # Components of unit vectors lie within [-1, 1]: a range beyond that is not one `calibrate` wrote,
    # and would make a step so coarse (or infinite) that every code is the same.
    if not (np.isfinite(low).all() and np.isfinite(high).all() and (low <= high).all()):
        raise CalibrationError(f"{where}: values must be finite, with min <= max")
    if (low < -UNIT_BOUND).any() or (high > UNIT_BOUND).any():
        raise CalibrationError(f"{where}: values must lie within [-1, 1] (components of unit vectors)")
    return low, high


def _ranges_id(ranges: dict[int, tuple[np.ndarray, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for d in sorted(ranges):
        low, high = ranges[d]
        digest.update(str(d).encode() + low.astype("<f8").tobytes() + high.astype("<f8").tobytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Quantizer:
    """What the embed handler quantizes with: the operator's calibration, or the fixed scale."""

    calibration: Calibration | None = None

    @property
    def label(self) -> str:
        return self.calibration.label if self.calibration else "fixed"

    def scale(self, dimension: int) -> Scale | None:
        """The int8/uint8 map for `dimension`; None when a calibration does not cover it."""
        if self.calibration is None:
            return Scale.fixed(dimension)
        return self.calibration.scale(dimension)

    def covered(self) -> list[int]:
        return sorted(self.calibration.ranges) if self.calibration else []
