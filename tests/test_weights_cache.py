"""The weights cache (daemon/loading/weights_cache.py): a quantized model kept as converted serves the very
vectors the conversion gives, and an entry that is corrupt, truncated, foreign, stale or writable by
others is rebuilt, never served."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_w8a8, start_daemon
from daemon.config import MediaPolicy, ModelSettings
from daemon.loading.fingerprint import DigestCache, fingerprint_directory
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import InputItem
from daemon.loading.weights_cache import CACHE_VERSION, WeightsCache

pytest.importorskip("torchao")
FORMATS = ["int8", "nf4", pytest.param("w8a8", marks=needs_w8a8)]
ITEM = InputItem(where="inputs[0]", texts=("a text to embed",))


@pytest.fixture
def cache(tmp_path) -> WeightsCache:
    return WeightsCache(tmp_path / "weights", tmp_path / "fingerprints.json")


def load(tiny_dir: Path, cache: WeightsCache | None, fmt: str, kind: str = "embedding"):
    """(the model, what it computes for ITEM) loaded as the daemon loads it; any entry written."""
    from daemon.models import EmbeddingModel, RerankerModel

    found = fingerprint_directory(tiny_dir, DigestCache(None))
    settings = ModelSettings(str(tiny_dir), dtype="float32", quantize=fmt)
    if kind == "embedding":
        model = EmbeddingModel(settings, MediaReader(MediaPolicy()), tiny_dir, found, cache)
        out = model.embed([model.prepare(ITEM, None)]).numpy()
    else:
        model = RerankerModel(settings, MediaReader(MediaPolicy()), tiny_dir, found, cache)
        out = np.asarray(model.score([model.prepare(ITEM, ITEM, None)]))
    writer = model.keep_converted()  # as the daemon does once the files are known unchanged
    if writer is not None:
        writer.join(60)
    return model, out


def entry_of(cache: WeightsCache) -> tuple[Path, Path]:
    [entry] = sorted(cache.directory.glob("*.safetensors"))
    return entry, entry.with_suffix(".json")


@pytest.mark.parametrize("kind", ["embedding", "reranker"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_model_from_the_cache_computes_exactly_what_its_conversion_did(tiny_dir, cache, fmt, kind):
    first, converted = load(tiny_dir, cache, fmt, kind)
    again, cached = load(tiny_dir, cache, fmt, kind)
    assert not first.loaded.cached and again.loaded.cached
    assert np.array_equal(converted, cached)
    from daemon.loading.weights import model_bytes

    assert model_bytes(again.full_model) == model_bytes(first.full_model)


def test_an_entry_is_kept_per_model_and_format(tiny_dir, cache):
    load(tiny_dir, cache, "int8")
    load(tiny_dir, cache, "int8", "reranker")
    load(tiny_dir, cache, "nf4")
    assert cache.stats()["entries"] == 3 and cache.stats()["bytes"] > 0


def test_a_checked_entry_is_not_hashed_again_until_it_changes(tiny_dir, cache):
    load(tiny_dir, cache, "int8")
    entry, _ = entry_of(cache)
    load(tiny_dir, cache, "int8")  # checked against its digest as it was read; the digest cache learned it
    assert DigestCache(cache.digests).get(os.path.realpath(entry), os.stat(entry)) is not None


def _flip_a_byte(entry: Path) -> None:
    with open(entry, "r+b") as f:
        f.seek(entry.stat().st_size - 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))


def _truncate(entry: Path) -> None:
    os.truncate(entry, entry.stat().st_size // 2)


def _other_models_entry(entry: Path) -> None:
    """The entry replaced by the reranker's (another model's), sidecar and all, under this name."""
    sidecar = entry.with_suffix(".json")
    others = [p for p in entry.parent.glob("*.safetensors") if p != entry]
    shutil.copyfile(others[0], entry)
    shutil.copyfile(others[0].with_suffix(".json"), sidecar)
    for path in (entry, sidecar):
        path.chmod(0o600)


def _stale_version(entry: Path) -> None:
    sidecar = entry.with_suffix(".json")
    about = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**about, "version": CACHE_VERSION - 1}))


def _writable_by_others(entry: Path) -> None:
    entry.chmod(0o666)


def _sidecar_gone(entry: Path) -> None:
    entry.with_suffix(".json").unlink()


def _no_digest(entry: Path) -> None:
    sidecar = entry.with_suffix(".json")
    about = json.loads(sidecar.read_text())
    del about["sha256"]
    sidecar.write_text(json.dumps(about))
    os.utime(entry, ns=(1, 1))  # and an identity the digest cache has not seen: nothing vouches for it


def _a_tensor_of_another_shape(entry: Path) -> None:
    """A well-formed entry with its own true digest, one of whose tensors does not fit the model."""
    import torch

    from daemon.loading.reader import Target, read_files
    from daemon.loading.weights_cache import _write_atomically, write_safetensors

    tensors, reads = read_files([entry], lambda e: Target())
    name = next(k for k in tensors if k.endswith("input_layernorm.weight"))
    tensors[name] = torch.ones(tensors[name].numel() + 1, dtype=tensors[name].dtype)
    digest = _write_atomically(entry, lambda f: write_safetensors(f, tensors, reads[0].metadata))
    sidecar = entry.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "sha256": digest}))


DAMAGE = {"a flipped byte": _flip_a_byte, "truncated": _truncate, "another model's": _other_models_entry,
          "an older version": _stale_version, "writable by others": _writable_by_others, "no sidecar": _sidecar_gone,
          "no digest": _no_digest, "a tensor that does not fit": _a_tensor_of_another_shape}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_entry_is_rebuilt_never_served(tiny_dir, cache, damage):
    if damage is _other_models_entry:
        load(tiny_dir, cache, "int8", "reranker")
    _, converted = load(tiny_dir, cache, "int8")
    entry = next(p for p in cache.directory.glob("*.safetensors")
                 if json.loads(p.with_suffix(".json").read_text())["model"].startswith("Qwen3VLForEmbedding"))
    load(tiny_dir, cache, "int8")  # now known to the digest cache: damage must still be caught
    damage(entry)
    model, out = load(tiny_dir, cache, "int8")
    assert not model.loaded.cached and np.array_equal(out, converted)
    again, out = load(tiny_dir, cache, "int8")  # rebuilt: served from the new entry
    assert again.loaded.cached and np.array_equal(out, converted)


def test_an_entry_of_older_files_is_dropped_when_the_new_one_is_written(tiny_dir, cache, tmp_path):
    copy = Path(shutil.copytree(tiny_dir, tmp_path / "copy"))
    load(copy, cache, "int8")
    old, _ = entry_of(cache)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    load(copy, cache, "int8")  # new files, new fingerprint: the old entry can never be served again
    assert not old.exists() and cache.stats()["entries"] == 1


def test_no_cache_converts_each_load(tiny_dir):
    first, a = load(tiny_dir, None, "int8")
    again, b = load(tiny_dir, None, "int8")
    assert not first.loaded.cached and not again.loaded.cached and np.array_equal(a, b)


def test_the_cache_sits_beside_the_fingerprint_cache_and_can_be_turned_off(tmp_path):
    from daemon.config import DaemonConfig

    fingerprints = tmp_path / "fp" / "fingerprints.json"
    assert DaemonConfig(fingerprint_cache=fingerprints).weights_cache_directory() == fingerprints.parent / "weights"
    assert DaemonConfig(fingerprint_cache=fingerprints, weights_cache=False).weights_cache_directory() is None
    assert DaemonConfig(fingerprint_cache=None).weights_cache_directory() is None


def test_a_restarted_quantized_daemon_loads_from_the_cache_and_health_shows_its_size(tiny_dir, tmp_path):
    fingerprints = tmp_path / "fp" / "fingerprints.json"
    args = ("--embedding-model", str(tiny_dir), "--reranker-model", "none", "--quantize", "int8",
            "--fingerprint-cache", str(fingerprints), "--log-level", "info")
    proc = start_daemon(tmp_path / "first", *args)
    try:
        with proc.client() as c:
            before = c.embed(["the same text"]).embeddings
            for _ in range(600):
                stats = c.health()["weights_cache"]
                if stats["entries"] == 1 and not stats["writing"]:
                    break
                time.sleep(0.05)
    finally:
        proc.stop()
    assert stats["bytes"] > 0 and (fingerprints.parent / "weights").stat().st_mode & 0o077 == 0
    proc = start_daemon(tmp_path / "again", *args)
    try:
        with proc.client() as c:
            assert np.array_equal(c.embed(["the same text"]).embeddings, before)
        assert "from the weights cache" in proc.log.read_text()
    finally:
        proc.stop()
    proc = start_daemon(tmp_path / "off", *args, "--no-weights-cache")
    try:
        with proc.client() as c:
            assert c.health()["weights_cache"] is None
    finally:
        proc.stop()


def test_an_entry_is_written_only_once_the_caller_vouches_for_the_files(tiny_dir, cache):
    from daemon.models import EmbeddingModel

    found = fingerprint_directory(tiny_dir, DigestCache(None))
    model = EmbeddingModel(ModelSettings(str(tiny_dir), dtype="float32", quantize="int8"), MediaReader(MediaPolicy()),
                           tiny_dir, found, cache)
    time.sleep(0.2)
    assert cache.stats()["entries"] == 0  # files changed meanwhile would make it another model's entry
    model.keep_converted().join(60)
    assert cache.stats()["entries"] == 1


def test_a_temporary_file_of_a_writer_that_died_is_swept_not_counted(tiny_dir, cache):
    cache.directory.mkdir(parents=True)
    dead = cache.directory / ".0123.safetensors.999999999.abcd"  # no such process
    live = cache.directory / f".4567.safetensors.{os.getpid()}.abcd"
    dead.write_bytes(b"half an entry")
    live.write_bytes(b"being written")
    assert cache.stats()["writing"] == 1
    load(tiny_dir, cache, "int8")
    assert not dead.exists() and live.exists()


def test_a_failed_attempt_to_load_an_entry_keeps_it(tiny_dir, cache, monkeypatch):
    import torch

    from daemon.loading import weights_cache

    _, converted = load(tiny_dir, cache, "int8")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room on the device this time")

    with monkeypatch.context() as patch:
        patch.setattr(weights_cache, "rebuild", out_of_memory)
        model, out = load(tiny_dir, cache, "int8")
    assert not model.loaded.cached and np.array_equal(out, converted) and cache.stats()["entries"] == 1
    again, _ = load(tiny_dir, cache, "int8")
    assert again.loaded.cached
