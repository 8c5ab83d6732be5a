"""Reading safetensors files into owned memory (daemon/loading/reader.py): the same tensors as safetensors
reads, converted on the way where asked, hashed as they pass, and every malformed or changing file
refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from daemon.loading import reader
from daemon.errors import ModelLoadError
from daemon.loading.reader import Target, read_files

KEEP = lambda entry: Target()  # noqa: E731 (every tensor as the file holds it, on the CPU)


@pytest.fixture
def weights(tmp_path) -> Path:
    """A safetensors file of every dtype the models use, odd sizes, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a.f32": torch.randn(37, 19, generator=g), "b.bf16": torch.randn(5, 301, generator=g).bfloat16(),
        "c.f16": torch.randn(129, generator=g).half(), "d.i64": torch.arange(-7, 50),
        "e.i8": torch.randint(-128, 127, (3, 3, 3), generator=g, dtype=torch.int8),
        "f.u8": torch.randint(0, 255, (17,), generator=g, dtype=torch.uint8), "g.bool": torch.rand(9, generator=g) > .5,
        "h.scalar": torch.tensor(2.5), "i.empty": torch.zeros(0, 4),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def reference(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(params=[64 << 20, 48], ids=["whole", "small-pieces"])
def pieces(request, monkeypatch):
    """Reads in one piece per tensor, and in pieces of 48 bytes (every tensor split, staging reused)."""
    monkeypatch.setattr(reader, "PIECE_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("hashed", [False, True], ids=["parallel", "hashing"])
def test_every_tensor_is_read_as_safetensors_reads_it(weights, pieces, hashed):
    tensors, reads = read_files([weights], KEEP, hashed=frozenset({weights}) if hashed else frozenset())
    want = reference(weights)
    assert tensors.keys() == want.keys()
    for name, tensor in want.items():
        assert tensors[name].dtype == tensor.dtype and tensors[name].shape == tensor.shape
        assert torch.equal(tensors[name], tensor), name
    assert reads[0].metadata == {"format": "pt"}


@pytest.mark.parametrize("hashed", [False, True], ids=["parallel", "hashing"])
def test_floating_tensors_converted_on_the_way_equal_the_cast(weights, pieces, hashed):
    tensors, _ = read_files([weights], lambda e: Target(torch.float32), hashed=frozenset({weights}) if hashed else
                            frozenset())
    for name, tensor in reference(weights).items():
        expected = tensor.float() if tensor.is_floating_point() else tensor
        assert tensors[name].dtype == expected.dtype and torch.equal(tensors[name], expected), name


def test_the_digest_of_a_hashed_read_is_the_files_sha256_even_of_tensors_not_kept(weights, pieces):
    _, reads = read_files([weights], KEEP, hashed=frozenset({weights}), wanted=lambda name: name != "b.bf16")
    assert reads[0].digest == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_tensor_not_wanted_is_not_read(weights):
    tensors, reads = read_files([weights], KEEP, wanted=lambda name: not name.startswith("b."))
    assert "b.bf16" not in tensors and "a.f32" in tensors and reads[0].digest is None


def test_read_tensors_are_the_processes_own_memory(weights):
    tensors, _ = read_files([weights], KEEP)
    before = {k: v.clone() for k, v in tensors.items()}
    header = 8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]
    with open(weights, "r+b") as f:  # zeroed in place, then cut: a mapping would change or fault
        f.seek(header)
        f.write(b"\0" * (weights.stat().st_size - header))
        f.truncate(header)
    assert all(torch.equal(tensors[k], before[k]) for k in before)


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    header, body = edit(header, body)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _shift(name: str, by: int):
    def edit(header, body):
        header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]
        return header, body
    return edit


def _hole(header, body):
    """The last tensor moved 8 bytes on, the file 8 bytes longer: 8 bytes that no tensor holds."""
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return _shift(last, 8)(header, body)[0], body + b"\0" * 8


MALFORMED = {
    "empty": lambda p: p.write_bytes(b""),
    "shorter than its length": lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
    "not JSON": lambda p: p.write_bytes(struct.pack("<Q", 3) + b"{x}"),
    "not an object": lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"),
    "unknown dtype": lambda p: _rewrite_header(p, lambda h, b: ({**h, "a.f32": {**h["a.f32"], "dtype": "Q9"}}, b)),
    "negative shape": lambda p: _rewrite_header(p, lambda h, b: ({**h, "a.f32": {**h["a.f32"], "shape": [-1]}}, b)),
    "shape and size disagree": lambda p: _rewrite_header(
        p, lambda h, b: ({**h, "a.f32": {**h["a.f32"], "shape": [37, 20]}}, b)),
    "a hole": lambda p: _rewrite_header(p, _hole),
    "an overlap": lambda p: _rewrite_header(p, _shift("h.scalar", -2)),
    "trailing bytes": lambda p: _rewrite_header(p, lambda h, b: (h, b + b"junk")),
    "cut short": lambda p: p.write_bytes(p.read_bytes()[:-3]),
    "a dimension past int64": lambda p: _rewrite_header(p, lambda h, b: ({**h, "i.empty": {**h["i.empty"],
                                                                                         "shape": [0, 2 ** 64]}}, b)),
    "dimensions whose product overflows": lambda p: _rewrite_header(
        p, lambda h, b: ({**h, "i.empty": {**h["i.empty"], "shape": [2 ** 62, 2 ** 62, 0]}}, b)),
    "a boolean dimension": lambda p: _rewrite_header(p, lambda h, b: ({**h, "i.empty": {**h["i.empty"],
                                                                                      "shape": [True, 0]}}, b)),
}


@pytest.mark.parametrize("damage", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_file_that_is_not_safetensors_is_refused_in_one_line_naming_it(weights, damage):
    damage(weights)
    with pytest.raises(ModelLoadError) as err:
        read_files([weights], KEEP)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def test_a_file_that_is_not_the_one_fingerprinted_is_refused_before_it_is_read(weights):
    fingerprinted = _identity(weights)
    os.utime(weights, ns=(1, 1))  # another identity, and no digest to check the bytes against
    with pytest.raises(ModelLoadError, match="changed after the daemon fingerprinted it"):
        read_files([weights], KEEP, expect={weights: fingerprinted})
    assert read_files([weights], KEEP, expect={weights: _identity(weights)})[0]


def test_a_file_whose_metadata_alone_changed_is_read_when_its_bytes_keep_their_digest(weights):
    fingerprinted, digest = _identity(weights), hashlib.sha256(weights.read_bytes()).hexdigest()
    weights.chmod(0o640)  # a chmod: a new ctime, the same bytes
    tensors, reads = read_files([weights], KEEP, expect={weights: fingerprinted}, digests={weights: digest})
    assert reads[0].digest == digest and tensors.keys() == reference(weights).keys()


def test_a_file_whose_bytes_changed_under_its_old_times_is_refused(weights):
    fingerprinted, digest = _identity(weights), hashlib.sha256(weights.read_bytes()).hexdigest()
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelLoadError, match="changed after the daemon fingerprinted it"):
        read_files([weights], KEEP, expect={weights: fingerprinted}, digests={weights: digest})


@pytest.mark.parametrize("hashed", [False, True], ids=["parallel", "hashing"])
def test_a_file_written_while_it_is_read_stops_the_load_in_one_line(weights, pieces, monkeypatch, hashed):
    real = os.preadv

    def write_then_read(fd, buffers, offset):
        os.utime(weights, ns=(5, 5))
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader.os, "preadv", write_then_read)
    with pytest.raises(ModelLoadError, match="changed while it was being loaded") as err:
        read_files([weights], KEEP, hashed=frozenset({weights}) if hashed else frozenset())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("hashed", [False, True], ids=["parallel", "hashing"])
def test_a_file_cut_while_it_is_read_stops_the_load_in_one_line(weights, pieces, monkeypatch, hashed):
    real = os.preadv

    def cut_then_read(fd, buffers, offset):
        os.truncate(weights, 100)
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader.os, "preadv", cut_then_read)
    with pytest.raises(ModelLoadError, match="cut short|changed while") as err:
        read_files([weights], KEEP, hashed=frozenset({weights}) if hashed else frozenset())
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def test_a_failure_while_hashing_stops_the_reading_thread_too(weights, monkeypatch):
    monkeypatch.setattr(reader, "PIECE_BYTES", 48)

    def fail(self, piece, staged):
        raise RuntimeError("the device refused the copy")

    monkeypatch.setattr(reader._Staging, "land", fail)
    with pytest.raises(RuntimeError, match="refused the copy"):
        read_files([weights], lambda e: Target(torch.float32), hashed=frozenset({weights}))
    assert not [t for t in threading.enumerate() if t.name.startswith("qwen3vl-read")]


def test_a_private_read_refuses_a_file_others_may_write(weights):
    weights.chmod(0o666)
    with pytest.raises(ModelLoadError, match="writable by others"):
        read_files([weights], KEEP, private=True)
    weights.chmod(0o600)
    assert read_files([weights], KEEP, private=True)[0]
