"""The start says what fits: memory estimated from the files' headers, free memory as the system
reports it, and a refusal before any weight is loaded whose advice does fit."""

from __future__ import annotations

import re
import struct

import pytest

from conftest import start_daemon
from daemon.errors import ModelLoadError
from daemon.fit import Free, Plan, check_fit, checkpoint_shape, cpu_free, estimate, need_bytes, read_header

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
    room = total[("int8", "float32")]  # int8 fits in float32; so does everything in bfloat16, which comes first
    with pytest.raises(ModelLoadError) as caught:
        check_fit(plans, 4096, Free(room, "test"), None, True, False)
    assert re.search(r"pass --dtype bfloat16 \(about .*\), or --quantize int8 \(about", str(caught.value))
    with pytest.raises(ModelLoadError) as caught:
        check_fit(plans, 4096, Free(room, "test"), None, False, False)  # no bfloat16 on this device
    assert "pass --quantize int8 (about" in str(caught.value) and "bfloat16" not in str(caught.value)


def _advised_flags(message: str) -> list[str]:
    found = re.search(r"pass (.*?) \(about", message)
    assert found, message
    return found.group(1).split()


def test_a_start_that_cannot_fit_stops_before_loading_and_its_advice_starts(tmp_path, tiny_dir):
    models = ("--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir))
    need = need_bytes(check_fit(_plans(tiny_dir), 4096, Free(10 * GIB, ""), None, True, False))
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
