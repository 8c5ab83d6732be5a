"""Model identity: fingerprints of the files a model is loaded from, their cache, and pinning them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fingerprint import hub_snapshot
from conftest import start_daemon
from daemon.engine.backends import load_model_backends
from qwen3vl_client.client import AsyncClient, ModelMismatch
from daemon.config import DaemonConfig, ModelSettings, default_fingerprint_cache
from daemon.errors import ModelLoadError
from daemon.loading.fingerprint import DigestCache, fingerprint_directory, model_directory
from daemon.engine.residency import Residency


def fingerprint(directory: Path, cache: Path | None = None) -> str:
    return fingerprint_directory(directory, DigestCache(cache)).value


@pytest.fixture
def copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def test_the_same_files_anywhere_have_the_same_fingerprint(tiny_dir, copy):
    assert fingerprint(copy) == fingerprint(tiny_dir)
    assert len(fingerprint(copy)) == 20 and int(fingerprint(copy), 16) >= 0


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                                  "chat_template.jinja", "processor_config.json"])
def test_any_byte_of_weights_config_tokenizer_or_template_changes_it(tiny_dir, copy, name):
    path = copy / name
    if path.suffix == ".safetensors":
        flip_last_byte(path)  # a weight's last byte: the header stays valid
    else:
        path.write_text(path.read_text() + " ")
    assert fingerprint(copy) != fingerprint(tiny_dir)


def test_files_that_loading_does_not_read_change_nothing(tiny_dir, copy):
    (copy / "README.md").write_text("# a model card")
    (copy / "pytorch_model.bin").write_bytes(b"never loaded")
    (copy / "generation_config.json").write_text("{}")
    assert fingerprint(copy) == fingerprint(tiny_dir)


def test_an_added_weight_shard_changes_it(tiny_dir, copy):
    shutil.copy(copy / "model.safetensors", copy / "model-extra.safetensors")
    assert fingerprint(copy) != fingerprint(tiny_dir)


def test_a_repeated_start_hashes_nothing(copy, tmp_path):
    cache = tmp_path / "fp.json"
    first = fingerprint_directory(copy, DigestCache(cache))
    again = fingerprint_directory(copy, DigestCache(cache))
    assert first.hashed_bytes == first.bytes > 0 and again.hashed_bytes == 0 and again.value == first.value
    assert oct(cache.stat().st_mode & 0o777) == "0o600"


def test_a_file_rewritten_in_place_with_its_old_size_and_mtime_is_hashed_again(copy, tmp_path):
    cache, weights = tmp_path / "fp.json", copy / "model.safetensors"
    before = fingerprint(copy, cache)
    st = weights.stat()
    flip_last_byte(weights)  # same size, same inode
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: only the ctime tells
    after = fingerprint_directory(copy, DigestCache(cache))
    assert after.hashed_bytes > 0 and after.value != before


def test_a_file_replaced_by_another_of_the_same_size_and_mtime_is_hashed_again(copy, tmp_path):
    cache, config = tmp_path / "fp.json", copy / "config.json"
    before = fingerprint(copy, cache)
    st = config.stat()
    text = config.read_text()
    changed = text.replace("64", "65", 1)
    assert changed != text and len(changed) == len(text)
    replacement = copy / "config.json.tmp"
    replacement.write_text(changed)
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, config)  # a new inode under the old name
    assert fingerprint(copy, cache) != before


@pytest.mark.parametrize("content", [b"not json", b"[1,2]", b'{"files": 5}', b'{"files": {"x": 1}}', b"\xff" * 10])
def test_a_corrupt_cache_is_ignored(tiny_dir, copy, tmp_path, content):
    cache = tmp_path / "fp.json"
    cache.write_bytes(content)
    assert fingerprint(copy, cache) == fingerprint(tiny_dir)
    assert json.loads(cache.read_text())["version"] == 1  # and replaced by a good one


def test_an_unwritable_cache_location_only_costs_the_hashing(tiny_dir, copy, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert fingerprint(copy, blocked / "sub" / "fp.json") == fingerprint(tiny_dir)


def test_a_hub_snapshot_is_hashed_once_like_any_directory(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = hub_snapshot(tiny_dir, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_directory("org/model", local_files_only=True) == snapshot
    cache = tmp_path / "fp.json"
    first = fingerprint_directory(snapshot, DigestCache(cache))
    again = fingerprint_directory(snapshot, DigestCache(cache))
    assert first.value == again.value == fingerprint(tiny_dir)  # the same files as a plain directory
    assert first.hashed_bytes == first.bytes and again.hashed_bytes == 0  # read once, then known


def test_a_link_to_a_hub_blob_whose_content_is_not_its_name_is_refused(tiny_dir, copy, tmp_path):
    """The blob's name claims checkpoint A's weights; its bytes are another checkpoint's."""
    weights_a = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    flip_last_byte(copy / "model.safetensors")
    blobs = tmp_path / "models--org--m" / "blobs"
    blobs.mkdir(parents=True)
    shutil.move(copy / "model.safetensors", blobs / weights_a)
    (copy / "model.safetensors").symlink_to(blobs / weights_a)
    with pytest.raises(ModelLoadError, match="not the one its name says"):
        fingerprint_directory(copy, DigestCache(tmp_path / "fp.json"))


def test_a_hub_blob_edited_in_place_after_it_was_cached_is_refused(tiny_dir, tmp_path):
    snapshot = hub_snapshot(tiny_dir, tmp_path / "hub")
    cache = tmp_path / "fp.json"
    fingerprint(snapshot, cache)
    blob = (snapshot / "model.safetensors").resolve()
    st = blob.stat()
    os.unlink(blob)  # the blob is a hard link to the test checkpoint: write a copy of its own
    shutil.copyfile(tiny_dir / "model.safetensors", blob)
    flip_last_byte(blob)
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelLoadError, match="corrupt or was edited"):
        fingerprint(snapshot, cache)


def test_a_model_missing_from_the_hub_cache_cannot_be_fingerprinted(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the hub cache"):
        model_directory("org/absent", local_files_only=True)


def replace_file(path: Path) -> None:
    """A new file under the old name (as `mv` or a download tool would leave it)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    (path.parent / "new").write_bytes(bytes(data))
    os.replace(path.parent / "new", path)


@pytest.mark.parametrize("change", ["replaced", "rewritten", "deleted", "shard added", "relinked"])
def test_a_file_changed_after_it_was_hashed_fails_the_unchanged_check_naming_it(tiny_dir, copy, tmp_path, change):
    (tmp_path / "elsewhere").mkdir()
    weights = copy / "model.safetensors"
    shutil.copy(weights, tmp_path / "elsewhere" / "w.safetensors")
    os.replace(weights, tmp_path / "real.safetensors")
    weights.symlink_to(tmp_path / "real.safetensors")  # relinked: the same bytes under another real path
    found = fingerprint_directory(copy, DigestCache(None))
    found.check_unchanged()  # nothing changed yet
    if change == "replaced":
        replace_file(copy / "config.json")
    elif change == "rewritten":
        flip_last_byte(tmp_path / "real.safetensors")
    elif change == "deleted":
        (copy / "tokenizer.json").unlink()
    elif change == "shard added":
        shutil.copy(tmp_path / "elsewhere" / "w.safetensors", copy / "model-2.safetensors")
    else:
        weights.unlink()
        weights.symlink_to(tmp_path / "elsewhere" / "w.safetensors")
    with pytest.raises(ModelLoadError, match="while the model was loading") as err:
        found.check_unchanged()
    assert str(copy) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("change", ["chmod", "touch", "the same bytes copied back"])
def test_a_file_whose_metadata_alone_changed_passes_the_unchanged_check(copy, change):
    found = fingerprint_directory(copy, DigestCache(None))
    config = copy / "config.json"
    if change == "chmod":
        os.chmod(config, 0o644)  # the same mode: only its ctime moves
    elif change == "touch":
        os.utime(config, ns=(1, 1))
    else:
        (copy / "new").write_bytes(config.read_bytes())
        os.replace(copy / "new", config)
    found.check_unchanged()  # its content is what was hashed: the fingerprint is still its own


def test_weights_replaced_while_loading_stop_the_start_in_one_line(tiny_dir, copy, tmp_path):
    """The real loader, with the weights swapped for other bytes at the moment loading begins: the
    model may hold either version, so no fingerprint may be given to it."""
    other = tmp_path / "other.safetensors"
    shutil.copy(copy / "model.safetensors", other)
    flip_last_byte(other)

    def step(what, stage="weights"):
        if what and what.startswith("loading embedding model"):
            os.replace(other, copy / "model.safetensors")

    config = DaemonConfig(embedding=ModelSettings(str(copy), dtype="float32"), reranker=None, warmup=False,
                          fingerprint_cache=tmp_path / "fp.json")
    with pytest.raises(ModelLoadError, match="model.safetensors changed after the daemon fingerprinted it"):
        load_model_backends(config, {}, step)


def test_the_files_are_fingerprinted_before_the_weights_load(tiny_dir, copy, tmp_path):
    steps = []
    config = DaemonConfig(embedding=ModelSettings(str(copy), dtype="float32"), reranker=None, warmup=False,
                          fingerprint_cache=tmp_path / "fp.json")
    models = Residency()
    load_model_backends(config, {}, lambda what, stage="weights": steps.append(stage), models=models)
    assert steps.index("fingerprint") < len(steps) - 1 - steps[::-1].index("weights")
    assert models.loaded[f"embedding:{copy.name}"].info.fingerprint == fingerprint(tiny_dir)


def test_every_reply_names_the_model_that_made_it(client):
    health = client.health()
    assert client.embed(["x"]).fingerprint == health["embedding"]["fingerprint"]
    assert client.rerank("q", ["d"]).fingerprint == health["reranker"]["fingerprint"]


def test_a_request_pinned_to_the_served_model_is_answered(client):
    health = client.health()
    assert client.embed(["x"], expect_fingerprint=health["embedding"]["fingerprint"]).count == 1
    assert len(client.rerank("q", ["d"], expect_fingerprint=health["reranker"]["fingerprint"]).scores) == 1


@pytest.mark.parametrize("op", ["embed", "rerank"])
def test_a_request_pinned_to_another_model_is_a_model_mismatch_naming_both(client, op):
    served = client.health()["embedding" if op == "embed" else "reranker"]["fingerprint"]
    other = "0123456789abcdef0123"
    with pytest.raises(ModelMismatch) as err:
        if op == "embed":
            client.embed(["x"], expect_fingerprint=other)
        else:
            client.rerank("q", ["d"], expect_fingerprint=other)
    assert err.value.code == "model_mismatch" and (err.value.expected, err.value.actual) == (other, served)
    assert other in err.value.message and served in err.value.message


def test_a_prefix_of_the_fingerprint_is_not_the_fingerprint(client):
    served = client.health()["embedding"]["fingerprint"]
    with pytest.raises(ModelMismatch):
        client.embed(["x"], expect_fingerprint=served[:8])
    with pytest.raises(ModelMismatch):
        client.embed(["x"], expect_fingerprint=served.upper())


def test_two_daemons_serving_copies_of_the_same_files_agree(daemon, client, copy, tmp_path):
    other = start_daemon(tmp_path / "other", "--embedding-model", str(copy), "--reranker-model", "none")
    try:
        with other.client() as c:
            assert c.health()["embedding"]["fingerprint"] == client.health()["embedding"]["fingerprint"]
    finally:
        other.stop()


def test_the_cache_forgets_files_that_are_gone(tiny_dir, tmp_path):
    cache = tmp_path / "fp.json"
    gone = Path(shutil.copytree(tiny_dir, tmp_path / "gone"))
    fingerprint(gone, cache)
    shutil.rmtree(gone)
    fingerprint(tiny_dir, cache)
    kept = json.loads(cache.read_text())["files"]
    assert kept and all(path.startswith(str(tiny_dir.resolve())) for path in kept)


def test_the_async_client_pins_and_ranks_too(daemon, client):
    served = client.health()["reranker"]["fingerprint"]

    async def run():
        async with AsyncClient(daemon.endpoint, timeout=60) as c:
            ranked = await c.rerank("q", ["a", "b", "c"], top_n=2, expect_fingerprint=served)
            with pytest.raises(ModelMismatch):
                await c.embed(["x"], encoding="int8", expect_fingerprint="0" * 20)
            return ranked, await c.embed(["x"], encoding="ubinary")

    ranked, bits = asyncio.run(run())
    assert len(ranked.top) == 2 and ranked.fingerprint == served and bits.embeddings.shape == (1, 8)


def test_the_command_line_pins_and_ranks(daemon, client):
    served = client.health()["reranker"]["fingerprint"]
    command = [sys.executable, "-m", "daemon", "rerank", "q", "a", "b", "c", "--top-n", "2", "--endpoint", daemon.endpoint]
    done = subprocess.run([*command, "--expect-fingerprint", served], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and len(json.loads(done.stdout)["top"]) == 2
    done = subprocess.run([*command, "--expect-fingerprint", "0" * 20], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "model_mismatch" in done.stderr and served in done.stderr


def test_the_digest_cache_lives_in_systemds_cache_directory_else_the_users():
    assert default_fingerprint_cache({"CACHE_DIRECTORY": "/var/cache/qwen3vl:/other"}) == Path(
        "/var/cache/qwen3vl/fingerprints.json")
    assert default_fingerprint_cache({"XDG_CACHE_HOME": "/home/u/.c"}) == Path(
        "/home/u/.c/qwen3vl-daemon/fingerprints.json")


@pytest.mark.parametrize("content", [
    b"[" * 5000, b'{"files": ' + b"[" * 100000 + b"]" * 100000 + b"}", b'{"version": 1, "files": {"/x": "y"}}',
    b'{"files": {"/a": {"id": "x", "sha256": 5}}}', b"\xef\xbb\xbf{}", b"0" * (5 << 20), b"1e999", b'"\\ud800"'])
def test_any_content_of_the_cache_file_is_ignored_and_the_digests_recomputed(tiny_dir, copy, tmp_path, content):
    cache = tmp_path / "fp.json"
    cache.write_bytes(content)
    cache.chmod(0o600)
    found = fingerprint_directory(copy, DigestCache(cache))
    assert found.value == fingerprint(tiny_dir) and found.hashed_bytes == found.bytes


@pytest.mark.parametrize("kind", ["fifo", "directory", "world-writable", "another user's"])
def test_a_cache_that_is_not_a_private_regular_file_is_never_read(tiny_dir, copy, tmp_path, kind):
    cache = tmp_path / "fp.json"
    fingerprint(copy, cache)  # a cache that knows every digest
    if kind in ("fifo", "directory"):
        cache.unlink()
        os.mkfifo(cache) if kind == "fifo" else cache.mkdir()
    elif kind == "world-writable":
        cache.chmod(0o666)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(cache, 65534, 65534)
    found = fingerprint_directory(copy, DigestCache(cache))  # a FIFO would block here if it were opened to wait
    assert found.value == fingerprint(tiny_dir) and found.hashed_bytes == found.bytes


def _zero_weights_in_place(path: Path) -> None:
    """Every weight byte zeroed, in the same inode (as `cp new old` writes), then the file cut short."""
    import struct

    header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    with open(path, "r+b") as f:
        f.seek(header)
        f.write(b"\0" * (path.stat().st_size - header))
        f.flush()
        f.truncate(header)


def test_weights_written_over_in_place_after_loading_change_nothing_served(copy):
    """The loaded weights are the daemon's own copy, not a view of the file: the model keeps giving
    the vectors its fingerprint names, and a truncated file does not kill it (SIGBUS)."""
    from daemon.config import MediaPolicy
    from daemon.inputs.media_reader import MediaReader
    from qwen3vl_client.inputs import InputItem
    from daemon.models import EmbeddingModel

    model = EmbeddingModel(ModelSettings(str(copy), dtype="float32"), MediaReader(MediaPolicy()))
    item = InputItem(where="inputs[0]", texts=("the same text",))
    before = model.embed([model.prepare(item, None)]).numpy()
    _zero_weights_in_place(copy / "model.safetensors")
    after = model.embed([model.prepare(item, None)]).numpy()
    assert (before == after).all()


def _shard_into(copy: Path, relative: str) -> Path:
    """The weights moved to `relative` (inside or outside the checkpoint), named by an index."""
    from safetensors import safe_open

    with safe_open(str(copy / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    target = copy / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(copy / "model.safetensors", target)
    (copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, relative)}))
    return target


def test_weights_an_index_names_in_a_subdirectory_are_fingerprinted_loaded_and_owned(copy, tmp_path):
    shard = _shard_into(copy, "sub/model.safetensors")
    (copy / "decoy.safetensors").write_bytes(b"decoy")  # a top-level file, so the directory still has one
    before = fingerprint(copy)
    files = fingerprint_directory(copy, DigestCache(None))
    assert "sub/model.safetensors" in dict(files.identities)
    from daemon.config import MediaPolicy
    from daemon.inputs.media_reader import MediaReader
    from qwen3vl_client.inputs import InputItem
    from daemon.models import EmbeddingModel

    model = EmbeddingModel(ModelSettings(str(copy), dtype="float32"), MediaReader(MediaPolicy()), copy)
    item = InputItem(where="inputs[0]", texts=("the same text",))
    served = model.embed([model.prepare(item, None)]).numpy()
    _zero_weights_in_place(shard)  # the loaded shard is the daemon's own copy
    assert (model.embed([model.prepare(item, None)]).numpy() == served).all()
    assert fingerprint(copy) != before  # and the shard's bytes are in the fingerprint


@pytest.mark.parametrize("relative", ["../outside.safetensors", "/abs/model.safetensors", "sub/weights.bin"])
def test_an_index_naming_a_file_outside_the_checkpoint_or_not_safetensors_is_refused(copy, relative):
    from safetensors import safe_open

    with safe_open(str(copy / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, relative)}))
    with pytest.raises(ModelLoadError, match="only \\*.safetensors inside"):
        fingerprint(copy)


def test_a_chat_template_in_additional_chat_templates_is_part_of_it(tiny_dir, copy):
    (copy / "additional_chat_templates").mkdir()
    os.replace(copy / "chat_template.jinja", copy / "additional_chat_templates" / "default.jinja")
    before = fingerprint(copy)
    (copy / "additional_chat_templates" / "default.jinja").write_text("{{ 'changed' }}")
    assert fingerprint(copy) != before


def test_a_hub_blob_that_is_itself_a_link_to_other_bytes_is_refused(tiny_dir, tmp_path):
    snapshot = hub_snapshot(tiny_dir, tmp_path / "hub")
    blob = (snapshot / "model.safetensors").resolve()
    elsewhere = tmp_path / "elsewhere.bin"
    shutil.copyfile(blob, elsewhere)
    flip_last_byte(elsewhere)
    blob.unlink()
    blob.symlink_to(elsewhere)  # blobs/<sha256 of A> -> a file holding other bytes
    with pytest.raises(ModelLoadError, match="corrupt or was edited"):
        fingerprint(snapshot)


@pytest.mark.parametrize("missing", ["/nonexistent/qwen3vl-model", "./gone-model", "~/no-such-model-dir"])
def test_a_model_path_that_is_gone_is_named_as_a_missing_directory_not_a_hub_id(missing):
    with pytest.raises(ModelLoadError, match="the directory does not exist"):
        model_directory(missing, local_files_only=True)
