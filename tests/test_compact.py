"""Compact embeddings (int8, uint8, binary, ubinary) and the operator's int8 calibration.

The expected bytes are computed here from the formulas PROTOCOL.md states, not by the daemon's own
quantizer, from the float32 vectors the daemon returns for the same request."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import start_daemon
from qwen3vl_client.client import DaemonError
from daemon.errors import ModelLoadError
from daemon.outputs.encodings import Calibration, Quantizer, Scale, dequantize, quantize

TEXTS = ["a red apple", "the stock market fell sharply today", "x", "green pears and " * 12, "ok"]


def fixed_int8(vectors: np.ndarray) -> np.ndarray:
    """PROTOCOL.md: int8 = clip(round(x * 127 * sqrt(d) / 16), -128, 127), ties to even."""
    d = vectors.shape[1]
    return np.clip(np.rint(vectors.astype(np.float64) * 127 * math.sqrt(d) / 16), -128, 127).astype(np.int8)


def reference(floats: np.ndarray, encoding: str) -> np.ndarray:
    """The documented bytes of each compact encoding (fixed scale for int8/uint8)."""
    if encoding in ("int8", "uint8"):
        q = fixed_int8(floats)
        return q if encoding == "int8" else (q.astype(np.int16) + 128).astype(np.uint8)
    bits = np.packbits(floats > 0, axis=1)
    return bits if encoding == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)


def fixed_step(d: int) -> float:
    return 16 / (127 * math.sqrt(d))


def test_ubinary_is_packbits_of_the_float32_signs(client):
    floats = client.embed(TEXTS).embeddings
    got = client.embed(TEXTS, encoding="ubinary")
    assert got.embeddings.dtype == np.uint8 and got.embeddings.shape == (5, 8) and got.dimension == 64
    np.testing.assert_array_equal(got.embeddings, np.packbits(floats > 0, axis=1))


def test_binary_is_ubinary_minus_128_as_int8(client):
    ubinary = client.embed(TEXTS, encoding="ubinary").embeddings
    binary = client.embed(TEXTS, encoding="binary").embeddings
    assert binary.dtype == np.int8
    np.testing.assert_array_equal(binary.astype(np.int16), ubinary.astype(np.int16) - 128)


@pytest.mark.parametrize("dimension", [64, 32, 8])
def test_int8_is_the_documented_fixed_scale_and_dequantises_within_half_a_step(client, dimension):
    floats = client.embed(TEXTS, dimension=dimension).embeddings
    got = client.embed(TEXTS, dimension=dimension, encoding="int8")
    assert got.embeddings.dtype == np.int8 and got.embeddings.shape == (5, dimension)
    assert got.quantization == "fixed"
    np.testing.assert_array_equal(got.embeddings, fixed_int8(floats))
    back = got.embeddings.astype(np.float64) * fixed_step(dimension)
    assert np.abs(back - floats).max() <= fixed_step(dimension) / 2 + 1e-7


def test_uint8_is_int8_plus_128(client):
    int8 = client.embed(TEXTS, encoding="int8").embeddings
    uint8 = client.embed(TEXTS, encoding="uint8").embeddings
    assert uint8.dtype == np.uint8
    np.testing.assert_array_equal(uint8.astype(np.int16), int8.astype(np.int16) + 128)


@pytest.mark.parametrize("encoding", ["int8", "uint8", "binary", "ubinary"])
def test_an_input_quantizes_alike_alone_and_in_any_batch(client, encoding):
    """The bytes of an input depend on its own vector only. The float32 forward itself may differ in
    the last bits between batch shapes (padding changes the kernels' shapes); so the bytes must equal
    the quantized float reply of the same request, and differ between alone and batched only where
    the float32 vectors themselves differ."""
    order = [3, 0, 4, 1, 2]
    batched_f = client.embed([TEXTS[i] for i in order]).embeddings
    batched_q = client.embed([TEXTS[i] for i in order], encoding=encoding).embeddings
    for k, i in enumerate(order):
        alone_f = client.embed([TEXTS[i]]).embeddings
        alone_q = client.embed([TEXTS[i]], encoding=encoding).embeddings
        np.testing.assert_array_equal(alone_q, reference(alone_f, encoding))
        np.testing.assert_array_equal(batched_q[k:k + 1], reference(batched_f[k:k + 1], encoding))
        if np.array_equal(alone_f, batched_f[k:k + 1]):
            assert alone_q.tobytes() == batched_q[k:k + 1].tobytes()


vectors = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([8, 16, 64])),
                     elements=st.floats(-1, 1, width=32))


@settings(max_examples=200, deadline=None)
@given(batch=vectors, extreme=st.floats(-1, 1, width=32), calibrated=st.booleans(),
       encoding=st.sampled_from(["int8", "uint8", "binary", "ubinary"]))
def test_quantizing_a_row_never_depends_on_its_neighbours(batch, extreme, calibrated, encoding):
    d = batch.shape[1]
    scale = (Scale.from_range(np.full(d, -0.5), np.full(d, 0.3), "calibrated:x") if calibrated else Scale.fixed(d))
    neighbours = np.vstack([batch, np.full((1, d), extreme, np.float32)])  # a neighbour far off any range
    together = quantize(neighbours, encoding, scale)
    for i in range(batch.shape[0]):
        assert together[i].tobytes() == quantize(batch[i:i + 1], encoding, scale).tobytes()


@settings(max_examples=100, deadline=None)
@given(batch=vectors)
def test_calibrated_int8_dequantises_within_half_a_step_inside_the_range(batch):
    low, high = batch.min(axis=0), batch.max(axis=0)
    scale = Scale.from_range(low, high, "calibrated:x")
    for encoding in ("int8", "uint8"):
        back = dequantize(quantize(batch, encoding, scale), encoding, scale)
        assert (np.abs(back.astype(np.float64) - batch) <= scale.step / 2 + 1e-6).all()


def test_ranges_come_from_the_vectors_as_returned_for_each_dimension():
    raw = np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32)
    calibration = Calibration.compute(raw, [64, 16], "f" * 20, "m")
    cut = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(calibration.ranges[16][0], cut.min(axis=0), rtol=1e-6)
    assert Quantizer(calibration).scale(32) is None and Quantizer(calibration).covered() == [16, 64]
    assert Quantizer().scale(32).label == "fixed"


@pytest.fixture(scope="module")
def calibration_file(daemon, tmp_path_factory):
    """`qwen3vl-daemon calibrate` against the main daemon, from a sample of texts (and one image)."""
    folder = tmp_path_factory.mktemp("calibration")
    sample = folder / "sample.txt"
    lines = [f"sample text number {i} about {w}" for i, w in enumerate(["cats", "dogs", "stocks", "rain"] * 10)]
    sample.write_text("\n".join(lines + TEXTS + ["", json.dumps({"text": "a json input", "instruction": "Find."})]))
    out = folder / "calibration.json"
    done = subprocess.run([sys.executable, "-m", "daemon", "calibrate", str(sample), "--out", str(out),
                           "--endpoint", daemon.endpoint, "--dimension", "64", "--dimension", "32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["samples"] == len(lines) + len(TEXTS) + 1 and summary["dimensions"] == [32, 64]
    assert "fewer than 1000" in done.stderr
    return out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_dir, calibration_file):
    proc = start_daemon(tmp_path_factory.mktemp("calibrated"), "--embedding-model", str(tiny_dir),
                        "--reranker-model", "none", "--int8-calibration", str(calibration_file))
    with proc.client() as c:
        yield c
    proc.stop()


def test_a_calibrated_daemon_says_so_in_health_and_replies(calibrated, calibration_file):
    calibration = Calibration.load(calibration_file)
    health = calibrated.health()["embedding"]
    assert health["quantization"] == f"calibrated:{calibration.id}" and health["calibrated_dimensions"] == [32, 64]
    assert health["fingerprint"] == calibration.fingerprint
    assert calibrated.embed(["x"], encoding="int8").quantization == health["quantization"]


@pytest.mark.parametrize("dimension", [64, 32])
def test_calibrated_int8_follows_the_files_ranges(calibrated, calibration_file, dimension):
    low, high = Calibration.load(calibration_file).ranges[dimension]
    step = np.maximum((high - low) / 255, 1e-9)
    floats = calibrated.embed(TEXTS, dimension=dimension).embeddings
    got = calibrated.embed(TEXTS, dimension=dimension, encoding="int8").embeddings
    units = np.clip(np.rint((floats.astype(np.float64) - low) / step), 0, 255)
    np.testing.assert_array_equal(got.astype(np.int16), units - 128)
    # The sample held these texts, so no component is outside the ranges: within half a step.
    back = low + (got.astype(np.float64) + 128) * step
    assert (np.abs(back - floats) <= step / 2 + 1e-6).all()


def test_a_dimension_the_calibration_lacks_is_refused_by_name(calibrated):
    with pytest.raises(DaemonError) as err:
        calibrated.embed(["x"], dimension=48, encoding="int8")
    assert err.value.code == "invalid_request" and "dimension 48" in err.value.message and "32, 64" in err.value.message
    assert calibrated.embed(["x"], dimension=48, encoding="binary").embeddings.shape == (1, 6)


def test_a_calibration_from_another_model_stops_the_start(tmp_path, calibration_file, tiny_dir):
    data = json.loads(calibration_file.read_text())
    (tmp_path / "other.json").write_text(json.dumps({**data, "fingerprint": "0" * 20}))
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        "--int8-calibration", str(tmp_path / "other.json"), wait=False)
    assert proc.process.wait(120) != 0
    assert "calibrate` again" in proc.log.read_text() and "0" * 20 in proc.log.read_text()


def _calibration_with(samples: str = "3", model: str = '"m"', key: str = "1", low: str = "0", high: str = "0.5") -> str:
    """A calibration file's text with one field replaced by raw JSON."""
    return ('{"format": "qwen3vl-int8-calibration", "version": 1, "fingerprint": "f", "model": %s, "samples": %s, '
            '"ranges": {"%s": {"min": [%s], "max": [%s]}}}' % (model, samples, key, low, high))


@pytest.mark.parametrize("content, fragment", [
    ("not json", "not JSON"),
    ('{"format": "other"}', "not a version 1"),
    ('{"format": "qwen3vl-int8-calibration", "version": 1, "fingerprint": "f", "ranges": {"x": {}}}', "not a dimension"),
    ('{"format": "qwen3vl-int8-calibration", "version": 1, "fingerprint": "f", "ranges": {"2": {"min": [0], "max": [1]}}}',
     "need 2 numbers"),
    ('{"format": "qwen3vl-int8-calibration", "version": 1, "fingerprint": "f", '
     '"ranges": {"1": {"min": [1], "max": [0]}}}', "min <= max"),
    ('{"format": "qwen3vl-int8-calibration", "version": 1, "fingerprint": "f", '
     '"ranges": {"1": {"min": [NaN], "max": [0]}}}', "finite"),
    *[(_calibration_with(samples=value), "'samples' must be a whole number")
      for value in ('"abc"', "1e999", "[1]", "-1", "true", "1.5", "[" * 50 + "]" * 50)],
    ("[" * 5000, "not JSON"),
    (_calibration_with(samples="[" * 3000 + "]" * 3000), "not JSON"),  # deeper than the parser goes
    (_calibration_with(model="[1]"), "'model' must be a string"),
    *[(_calibration_with(key=key), "not a dimension") for key in ("0064", "+1", " 1", "1 ", "\\u0661", "0", "-1")],
    (_calibration_with(key="100000"), "returns at most 64"),
    (_calibration_with(key="65"), "returns at most 64"),
    (_calibration_with(low="-1e308", high="1e308"), "within [-1, 1]"),
    (_calibration_with(low="0", high="1.5"), "within [-1, 1]"),
    (_calibration_with(low='"0"', high="1"), "numbers only"),
    (_calibration_with(low="true", high="1"), "numbers only"),
    (_calibration_with(low="9" * 400, high="1"), "finite"),
    (_calibration_with().replace('"version": 1', '"version": true'), "not a version 1"),
    (_calibration_with().replace('"version": 1', '"version": 1.0'), "not a version 1"),
])
def test_a_broken_calibration_file_is_refused_before_loading(tmp_path, tiny_dir, content, fragment):
    (tmp_path / "c.json").write_text(content)
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        "--int8-calibration", str(tmp_path / "c.json"), wait=False)
    assert proc.process.wait(60) == 1
    lines = [line for line in proc.log.read_text().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "--int8-calibration" in lines[0], lines


def test_a_calibration_beyond_a_hub_models_size_is_refused_once_it_is_loaded(calibration_file, tiny_dir):
    from daemon.engine.backends import BackendInfo, _check_calibration

    calibration = Calibration.load(calibration_file)
    info = BackendInfo("m", "cpu", "float32", 64, hidden_size=32, fingerprint=calibration.fingerprint)
    with pytest.raises(ModelLoadError, match="dimension 64, but m returns at most 32"):
        _check_calibration(calibration, info)


@pytest.mark.parametrize("line, fragment", [
    (b"caf\xe9 au lait", ":3: not UTF-8 text (byte 4 of the line)"),
    (b"{" * 3000, ":3: a line starting with '{' must be a JSON input object"),
    (b'{"text": ' + b"[" * 5000 + b"}", ":3: a line starting with '{' must be a JSON input object"),
])
def test_a_bad_sample_line_is_named_by_file_and_line(tmp_path, line, fragment):
    sample = tmp_path / "sample.txt"
    sample.write_bytes(b"first text\nsecond text\n" + line + b"\nlast\n")
    done = subprocess.run([sys.executable, "-m", "daemon", "calibrate", str(sample), "--out", str(tmp_path / "c.json"),
                           "--endpoint", f"ipc://{tmp_path}/none.sock"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"{sample}{fragment}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("line, fragment", [
    ('{"text": 5}', "invalid_request: text[0]: expected a string"),
    ('{"instruction": 7, "text": "x"}', "invalid_request"),
])
def test_a_sample_input_the_daemon_refuses_is_named_by_file_and_line(daemon, tmp_path, line, fragment):
    sample = tmp_path / "sample.txt"
    sample.write_text("\n".join(["first text", "", "second text", line, "last"]) + "\n")
    done = subprocess.run([sys.executable, "-m", "daemon", "calibrate", str(sample), "--out", str(tmp_path / "c.json"),
                           "--endpoint", daemon.endpoint, "--batch", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"{sample}:4: " in done.stderr and fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "c.json").exists()
