"""Building a model from its files (daemon/loading/build.py): the tensors read become the model's weights
with no copy, and a first start reads each weight file once, hashing it as it passes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from daemon.loading import fingerprint as fingerprint_module
from daemon.config import DaemonConfig, ModelSettings
from daemon.errors import ModelLoadError
from daemon.loading.fingerprint import DigestCache, fingerprint_directory
from daemon.loading.build import Placed, WeightsRead, config_of, from_files
from daemon.models import EmbeddingModel, _embedding_class

CPU = torch.device("cpu")


@pytest.fixture
def copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def test_the_tensors_read_become_the_models_weights_without_a_copy(tiny_dir):
    weights = WeightsRead(tiny_dir, torch.float32, CPU, unused=EmbeddingModel.unused_weights)
    read = {t.data_ptr() for t in weights.result()[0].values()}
    loaded = from_files(_embedding_class(), ModelSettings(str(tiny_dir)), tiny_dir, torch.float32, CPU, weights)
    params = {p.data_ptr() for p in loaded.model.parameters()}
    assert params <= read and loaded.bytes_read > 0


def test_tensors_kept_where_they_are_pass_through_transformers_untouched(tiny_dir):
    """What an accelerator's load hands transformers (`Placed`), checked on the CPU: the model's
    weights are those very tensors, not copies the loader placed elsewhere."""
    cls = _embedding_class()
    tensors = WeightsRead(tiny_dir, torch.float32, CPU, unused=EmbeddingModel.unused_weights).result()[0]
    model = cls.from_pretrained(None, config=config_of(cls, ModelSettings(str(tiny_dir)), tiny_dir),
                                state_dict={k: Placed(v) for k, v in tensors.items()}, dtype=torch.float32)
    assert {p.data_ptr() for p in model.parameters()} <= {t.data_ptr() for t in tensors.values()}


def _fingerprint(copy: Path, cache: Path):
    from daemon.engine.backends import _fingerprint

    config = DaemonConfig(embedding=ModelSettings(str(copy), dtype="float32"), fingerprint_cache=cache)
    return _fingerprint(config, "embedding", config.embedding, True, copy, lambda *a: None)


def test_a_first_start_hashes_the_weights_as_it_reads_them_not_before(copy, tmp_path, monkeypatch):
    hashed = []
    real = fingerprint_module._hash_file
    monkeypatch.setattr(fingerprint_module, "_hash_file", lambda path: hashed.append(path.name) or real(path))
    found, weights = _fingerprint(copy, tmp_path / "fp.json")
    assert "model.safetensors" not in hashed and weights is not None
    assert found.value == fingerprint_directory(copy, DigestCache(None)).value and not found.pending
    again, weights = _fingerprint(copy, tmp_path / "fp.json")  # the digest cache learned the weights' digest
    assert again.value == found.value and again.hashed_bytes == 0
    assert weights.hashed() == {}  # read in the background for the load, not hashed


def test_a_model_loaded_later_is_hashed_at_start_as_before(copy, tmp_path):
    from daemon.engine.backends import _fingerprint

    config = DaemonConfig(embedding=ModelSettings(str(copy), dtype="float32"), load="on-demand",
                          fingerprint_cache=tmp_path / "fp.json")
    found, weights = _fingerprint(config, "embedding", config.embedding, True, copy, lambda *a: None)
    assert weights is None and found.hashed_bytes == found.bytes


def test_weights_replaced_between_fingerprinting_and_reading_stop_the_start(copy, tmp_path):
    found = fingerprint_directory(copy, DigestCache(None), frozenset({"model.safetensors"}))
    weights = copy / "model.safetensors"
    shutil.copyfile(weights, tmp_path / "other")
    os.replace(tmp_path / "other", weights)  # the same bytes, another file: not the one stat'ed
    with pytest.raises(ModelLoadError, match="changed after the daemon fingerprinted it"):
        EmbeddingModel.read_weights(ModelSettings(str(copy)), copy, found, hash_unknown=True).result()
