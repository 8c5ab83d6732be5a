"""The start says what fits: memory estimated from the files' headers, free memory as the system
reports it, and a refusal before any weight is loaded whose advice does fit."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest

from conftest import start_daemon
from daemon.errors import ModelLoadError
from daemon.engine.batching import CPU_BATCH_TOKENS
from daemon.loading.fit import Free, Plan, check_fit, checkpoint_shape, cpu_free, estimate, need_bytes, read_header

GIB = 1 << 30


def _meminfo(tmp_path, available_kb: int):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   {available_kb} kB\n")
    return path


def _cgroup_v2(tmp_path, levels: dict[str, tuple[str, int, int]]):
    """A cgroup v2 tree: {relative path: (memory.max, memory.current, inactive_file)}; the process in the deepest."""
    root = tmp_path / "cgroup"
    for rel, (limit, current, inactive) in levels.items():
        d = root / rel if rel else root
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(f"{limit}\n")
        (d / "memory.current").write_text(f"{current}\n")
        (d / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\nactive_file 5\n")
    own = tmp_path / "self-cgroup"
    own.write_text("0::/" + max(levels, key=len) + "\n")
    return root, own


def test_cpu_free_is_memavailable_without_a_cgroup_limit(tmp_path):
    root, own = _cgroup_v2(tmp_path, {"": ("max", 0, 0), "user.slice/app": ("max", 10, 0)})
    free = cpu_free(_meminfo(tmp_path, 8_000_000), root, own)
    assert free.bytes == 8_000_000 * 1024 and "MemAvailable" in free.source


def test_cpu_free_is_the_tightest_cgroup_room_counting_inactive_file_cache(tmp_path):
    root, own = _cgroup_v2(tmp_path, {"": ("max", 0, 0), "kubepods": (str(6 * GIB), 3 * GIB, 0),
                                      "kubepods/pod": (str(4 * GIB), 3 * GIB, GIB // 2)})
    free = cpu_free(_meminfo(tmp_path, 16_000_000), root, own)
    assert free.bytes == GIB + GIB // 2 and "cgroup limit" in free.source


def test_cpu_free_finds_a_cgroup_v1_limit_on_a_parent_and_in_a_container_without_its_own_namespace(tmp_path):
    root = tmp_path / "cgroup"
    parent, child = root / "memory" / "docker", root / "memory" / "docker" / "abc"
    child.mkdir(parents=True)
    (parent / "memory.limit_in_bytes").write_text(str(2 * GIB))
    (parent / "memory.usage_in_bytes").write_text(str(GIB))
    (child / "memory.limit_in_bytes").write_text(str(1 << 62))
    (child / "memory.usage_in_bytes").write_text(str(GIB))
    own = tmp_path / "self-cgroup"
    own.write_text("11:memory:/docker/abc\n")
    assert cpu_free(_meminfo(tmp_path, 16_000_000), root, own).bytes == GIB
    (root / "memory" / "memory.limit_in_bytes").write_text(str(3 * GIB))  # the container's own, at the mount
    (root / "memory" / "memory.usage_in_bytes").write_text(str(GIB // 2))
    own.write_text("11:memory:/docker/elsewhere\n")  # a host path this container cannot see
    assert cpu_free(_meminfo(tmp_path, 16_000_000), root, own).bytes == 3 * GIB - GIB // 2


def test_cpu_free_reads_a_cgroup_v1_memory_controller(tmp_path):
    base = tmp_path / "cgroup" / "memory" / "docker" / "abc"
    base.mkdir(parents=True)
    (base / "memory.limit_in_bytes").write_text(str(2 * GIB))
    (base / "memory.usage_in_bytes").write_text(str(GIB))
    (base / "memory.stat").write_text(f"total_inactive_file {GIB // 4}\n")
    own = tmp_path / "self-cgroup"
    own.write_text("12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n")
    assert cpu_free(_meminfo(tmp_path, 16_000_000), tmp_path / "cgroup", own).bytes == GIB + GIB // 4
    (base / "memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "no limit"
    assert cpu_free(_meminfo(tmp_path, 16_000_000), tmp_path / "cgroup", own).bytes == 16_000_000 * 1024


def test_a_file_that_is_not_safetensors_is_refused_in_one_line_naming_it(tmp_path):
    for name, content in (("short", b"\x01\x02"), ("huge", struct.pack("<Q", 1 << 40) + b"{}"),
                          ("list", struct.pack("<Q", 2) + b"[]"), ("text", struct.pack("<Q", 3) + b"abc")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ModelLoadError, match="not a safetensors file") as caught:
            read_header(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def _header_file(path, header: dict) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body)


@pytest.mark.parametrize("shape", [5, True, None, [True, 2], [-1, 4], [2.0, 3], [10 ** 200, 10 ** 200], "64",
                                   [100000] * 1000])
def test_a_header_shape_that_is_not_a_tensors_is_refused_in_one_line(tmp_path, tiny_dir, shape):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    _header_file(ckpt / "model.safetensors", {"a.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}})
    with pytest.raises(ModelLoadError, match="a.weight") as caught:
        checkpoint_shape(ckpt)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("field, value", [("hidden_size", 10 ** 400), ("intermediate_size", -5),
                                          ("hidden_size", True), ("intermediate_size", "128"), ("hidden_size", None),
                                          ("num_hidden_layers", 10 ** 12), ("vocab_size", -5),
                                          ("num_attention_heads", 0), ("num_key_value_heads", 2.5)])
def test_a_config_without_sane_sizes_is_refused_in_one_line(tmp_path, tiny_dir, field, value):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"][field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=f"hidden_size and an intermediate_size|{field} is") as caught:
        checkpoint_shape(ckpt)
    assert "\n" not in str(caught.value)


def test_a_daemon_on_a_checkpoint_with_a_lying_header_exits_in_one_line(tmp_path, tiny_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    header = read_header(ckpt / "model.safetensors")
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = 5
    _header_file(ckpt / "model.safetensors", header)
    proc = start_daemon(tmp_path / "d", "--embedding-model", str(ckpt), "--reranker-model", "none", wait=False)
    assert proc.process.wait(120) == 1
    lines = [line for line in proc.log.read_text().splitlines() if line.startswith("qwen3vl-daemon:")]
    assert len(lines) == 1 and "has no valid shape" in lines[0], proc.log.read_text()[-2000:]


def test_a_full_copy_beside_a_sharded_index_is_counted_once(tmp_path, tiny_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    single = checkpoint_shape(ckpt)
    shutil.copy(ckpt / "model.safetensors", ckpt / "model-00001-of-00001.safetensors")
    names = [k for k in read_header(ckpt / "model.safetensors") if k != "__metadata__"]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}))
    assert checkpoint_shape(ckpt) == single  # transformers loads model.safetensors; the shard is not counted
    (ckpt / "model.safetensors").unlink()
    assert checkpoint_shape(ckpt) == single  # now the index's shard, once


def test_the_reranker_counts_its_lm_head_while_loading_and_the_embedding_model_never(tiny_dir):
    shape = checkpoint_shape(tiny_dir)
    head = sum(n for name, _, n, _ in shape.tensors if name.startswith("lm_head."))
    assert head > 0  # the tiny checkpoint's head is untied
    assert estimate("reranker", shape, "none", "float32", 4096).transient_bytes == head * 4
    assert estimate("embedding", shape, "none", "float32", 4096).transient_bytes == 0


def test_the_estimate_counts_quantized_layers_smaller_and_skips_the_lm_head(tiny_dir):
    shape = checkpoint_shape(tiny_dir)
    sizes = {fmt: estimate("embedding", shape, fmt, "float32", 4096).weights_bytes for fmt in ("none", "int8", "nf4")}
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]
    stored = sum(n * 4 for name, _, n, _ in shape.tensors if not name.startswith("lm_head."))
    assert sizes["none"] == stored  # float32 checkpoint, float32 compute
    assert estimate("embedding", shape, "none", "bfloat16", 4096).weights_bytes == stored // 2


def _plans(tiny_dir, fmt="none", dtype="float32"):
    shape = checkpoint_shape(tiny_dir)
    return [Plan("embedding", shape, fmt, dtype), Plan("reranker", shape, fmt, dtype)]


def test_fitting_plans_pass_and_return_their_estimates(tiny_dir):
    estimates = check_fit(_plans(tiny_dir), 4096, Free(10 * GIB, "test"), None, True, False)
    assert [e.kind for e in estimates] == ["embedding", "reranker"] and all(e.total > 0 for e in estimates)


def test_a_budget_below_free_memory_is_the_limit_and_is_named(tiny_dir):
    plans = _plans(tiny_dir)
    need = need_bytes(check_fit(plans, 4096, Free(10 * GIB, "test"), None, True, False))
    with pytest.raises(ModelLoadError, match=r"--memory-budget is .* \(test\)"):
        check_fit(plans, 4096, Free(10 * GIB, "test"), need - 1, True, False)


def test_when_nothing_fits_the_refusal_says_so(tiny_dir):
    with pytest.raises(ModelLoadError, match="nothing smaller fits either"):
        check_fit(_plans(tiny_dir), 4096, Free(1000, "1 kB free"), None, True, False)


def test_advice_puts_the_most_faithful_setting_that_fits_first(tiny_dir):
    plans = _plans(tiny_dir)
    total = {(f, d): need_bytes(check_fit(_plans(tiny_dir, f, d), 4096, Free(10 * GIB, ""), None, True, False))
             for f in ("none", "int8", "nf4") for d in ("float32", "bfloat16")}
    room = total[("int8", "float32")]  # int8 fits in float32; so does everything in bfloat16
    with pytest.raises(ModelLoadError) as caught:
        check_fit(plans, 4096, Free(room, "test"), None, True, False)
    # A smaller batch first (the same outputs), then bfloat16, then quantizing.
    assert re.search(r"pass --max-batch-tokens 2048 \(about .*\), or --dtype bfloat16 \(about .*\); or "
                     r"--embedding-quantize int8 --reranker-quantize int8 \(about", str(caught.value)), caught.value
    room = need_bytes(check_fit(_plans(tiny_dir, "int8"), 512, Free(10 * GIB, ""), None, True, False))
    with pytest.raises(ModelLoadError) as caught:
        check_fit(plans, 512, Free(room, "test"), None, False, False)  # no smaller batch, no bfloat16
    assert "pass --embedding-quantize int8 --reranker-quantize int8 (about" in str(caught.value)
    assert "bfloat16" not in str(caught.value)


def _advised_flags(message: str) -> list[str]:
    found = re.search(r"pass (.*?) \(about", message)
    assert found, message
    return found.group(1).split()


def test_a_start_that_cannot_fit_stops_before_loading_and_its_advice_starts(tmp_path, tiny_dir):
    models = ("--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir))
    # What the daemon itself budgets for: a batch of the CPU's default size.
    need = need_bytes(check_fit(_plans(tiny_dir), CPU_BATCH_TOKENS, Free(10 * GIB, ""), None, True, False))
    budget = str(need - 1)
    refused = start_daemon(tmp_path / "refused", *models, "--memory-budget", budget, wait=False)
    assert refused.process.wait(120) == 1
    log = refused.log.read_text()
    line = next(line for line in log.splitlines() if "will not fit" in line)
    assert "--memory-budget is" in line and "loading embedding model" not in log
    advised = start_daemon(tmp_path / "advised", *models, "--memory-budget", budget, *_advised_flags(line))
    try:
        with advised.client() as c:
            load = c.health()["load"]
        assert load["memory_estimate_bytes"] > 0 and load["memory_bytes"] > 0
    finally:
        advised.stop()


def test_advice_names_each_models_format_so_it_applies_over_a_per_model_override(tmp_path, tiny_dir):
    models = ("--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir))
    plans = [Plan("embedding", checkpoint_shape(tiny_dir), "none", "float32"),
             Plan("reranker", checkpoint_shape(tiny_dir), "int8", "float32")]
    budget = str(need_bytes(check_fit(plans, 512, Free(10 * GIB, ""), None, True, False)) - 1)
    refused = start_daemon(tmp_path / "refused", *models, "--embedding-quantize", "none", "--quantize", "int8",
                           "--reranker-quantize", "int8", "--max-batch-tokens", "512", "--memory-budget", budget,
                           "--dtype", "float32", wait=False)
    assert refused.process.wait(120) == 1
    line = next(line for line in refused.log.read_text().splitlines() if "will not fit" in line)
    flags = _advised_flags(line)
    assert "--quantize" not in flags and any(f.endswith("-quantize") for f in flags), line
    advised = start_daemon(tmp_path / "advised", *models, "--embedding-quantize", "none", "--quantize", "int8",
                           "--reranker-quantize", "int8", "--max-batch-tokens", "512", "--memory-budget", budget,
                           "--dtype", "float32", *flags)
    advised.stop()


def test_advice_keeps_the_format_an_int8_calibration_was_made_for(tiny_dir):
    shape = checkpoint_shape(tiny_dir)
    plans = [Plan("embedding", shape, "none", "float32", fixed_format=True)]
    room = need_bytes(check_fit([Plan("embedding", shape, "int8", "float32")], 512, Free(10 * GIB, ""), None, True,
                                False))
    with pytest.raises(ModelLoadError) as caught:
        check_fit(plans, 512, Free(room, "test"), None, True, False)
    assert re.search(r": pass --dtype bfloat16 \(about [0-9.]+ MB\) \(--no-fit-check", str(caught.value)), caught.value


@pytest.mark.parametrize("value", ["0", "0.5", "-1", "1" * 400, "\u0661\u0662", "12Q", "1e3"])
def test_a_memory_budget_that_is_not_a_size_is_refused(tmp_path, tiny_dir, value):
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        "--memory-budget", value, wait=False)
    assert proc.process.wait(60) == 2
    log = proc.log.read_text()
    assert "--memory-budget" in log and "not a size of at least a byte" in log and "Traceback" not in log


def test_a_budget_with_no_fit_check_says_it_is_not_enforced(tmp_path, tiny_dir):
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        "--memory-budget", "1K", "--no-fit-check", "--log-level", "warning")
    proc.stop()
    assert "--memory-budget is not enforced: --no-fit-check" in proc.log.read_text()


def test_no_fit_check_loads_whatever_the_budget(tmp_path, tiny_dir):
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        "--memory-budget", "1K", "--no-fit-check")
    try:
        with proc.client() as c:
            health = c.health()
        assert health["status"] == "ready" and health["load"]["memory_estimate_bytes"] is None
        assert health["embedding"]["memory_estimate_bytes"] is None and health["embedding"]["memory_bytes"] > 0
    finally:
        proc.stop()
