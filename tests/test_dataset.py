"""embed-dataset, local mode: a real daemon on a real socket, the job as a real process."""

from __future__ import annotations

import io
import os
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import png_bytes, start_daemon
from daemon.dataset.progress import Progress
from daemon.dataset.store import ERRORS, Store
from daemon.loading.tiny import TinySpec, build_tiny_checkpoint

READ = {"ignore_prefixes": [".", "_", "errors"]}  # errors.jsonl sits beside the parts


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir):
    media = tmp_path_factory.mktemp("media")
    (media / "red.png").write_bytes(png_bytes((255, 0, 0)))
    daemon = start_daemon(tmp_path_factory.mktemp("dataset-daemon"), "--embedding-model", str(tiny_dir),
                          "--reranker-model", "none", "--allow-path", str(media))
    yield daemon, media
    daemon.stop()


def job(endpoint: str, source: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "daemon", "embed-dataset", str(source), "--out", str(out),
                           "--endpoint", endpoint, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def texts(n: int) -> list[dict]:
    return [{"id": i, "text": f"row {i}: " + "word " * (i % 40)} for i in range(n)]


def read_out(out: Path) -> dict:
    table = pq.read_table(out, **READ)
    return dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))


def reference(daemon, inputs: list, **options) -> np.ndarray:
    with daemon.client() as client:
        return np.concatenate([client.embed(inputs[i:i + 32], **options).embeddings for i in range(0, len(inputs), 32)])


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / ERRORS).read_text().splitlines()]


def test_every_row_is_written_once_with_the_vector_the_daemon_gives_for_it(served, tmp_path):
    daemon, _ = served
    rows = texts(150)
    summary = json.loads(job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out",
                             "--commit-rows", "40").stdout)
    assert summary["written"] == 150 and summary["errors"] == 0
    found = read_out(tmp_path / "out")
    assert sorted(found) == list(range(150))
    expected = reference(daemon, [r["text"] for r in rows])
    np.testing.assert_allclose(np.array([found[i] for i in range(150)]), expected, atol=1e-5)


def test_a_kill_at_any_moment_then_a_rerun_gives_every_id_exactly_once(served, tmp_path):
    daemon, _ = served
    rows = texts(1200)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "daemon", "embed-dataset", str(source), "--out", str(out), "--endpoint",
            daemon.endpoint, "--commit-rows", "8", "--batch-rows", "4", "--in-flight", "1"]
    for parts_before_kill in (1, 6):
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < parts_before_kill and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL, "the job ended before it could be killed"
        assert len(read_out(out)) < len(rows)
    summary = json.loads(job(daemon.endpoint, source, out).stdout)
    assert summary["skipped"] > 0 and summary["written"] == len(rows) - summary["skipped"]
    ids = pq.read_table(out, **READ).column("id").to_pylist()
    assert sorted(ids) == list(range(len(rows)))  # each once: no id lost, none twice
    found = read_out(out)
    expected = reference(daemon, [r["text"] for r in rows])
    np.testing.assert_allclose(np.array([found[i] for i in range(len(rows))]), expected, atol=1e-5)


def test_bad_rows_go_to_the_error_file_with_their_row_id_and_code_and_the_job_goes_on(served, tmp_path):
    daemon, media = served
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": ""}, "not json", {"text": "no id"},
            {"id": "c", "image": str(media / "missing.png")}, {"id": "a", "text": "again"},
            {"id": 7, "text": "an integer among strings"}, {"id": "d", "image": "/etc/passwd"},
            {"id": "e", "colour": "no input"}, {"id": "f", "image": str(media / "red.png")},
            {"id": "g", "input": {"text": "x", "bogus": 1}}, {"id": "h", "text": "fine too"},
            {"id": "i", "input": {}}, {"id": "j", "input": {"text": None, "image": None}}]
    out = tmp_path / "out"
    summary = json.loads(job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", rows), out).stdout)
    assert summary == {**summary, "written": 3, "errors": 11}
    assert sorted(read_out(out)) == ["a", "f", "h"]
    found = {e["row"]: e for e in errors(out)}
    assert sorted(found) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 13]
    assert found[1] == {"row": 1, "id": "b", "code": "invalid_request", "message": "text: empty text"}
    assert found[2]["id"] is None and "not a JSON object" in found[2]["message"]
    assert found[3]["message"] == "id: missing"
    assert found[4]["code"] == "input_error" and found[4]["message"].startswith("input.image[0]")
    assert found[5]["code"] == "duplicate_id" and "row 0" in found[5]["message"]
    assert "this dataset's ids are string" in found[6]["message"]
    assert found[7]["message"].startswith("input.image[0].path") and found[7]["id"] == "d"
    assert found[8]["message"].startswith("no input")
    assert found[10]["message"].startswith("input: unknown field(s) bogus")
    assert found[12]["message"] == found[13]["message"] == "input: nothing to embed (no text, image or video)"


def test_a_rerun_skips_the_recorded_errors_unless_told_to_retry_them(served, tmp_path):
    daemon, media = served
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "ok"}, {"id": 2, "image": "gone.png"}])
    out = tmp_path / "out"
    job(daemon.endpoint, source, out)
    again = json.loads(job(daemon.endpoint, source, out).stdout)
    assert again["written"] == again["errors"] == 0 and again["skipped"] == 2
    assert len(errors(out)) == 1
    write_jsonl(source, [{"id": 1, "text": "ok"}, {"id": 2, "image": str(media / "red.png")}])
    retried = json.loads(job(daemon.endpoint, source, out, "--retry-errors").stdout)
    assert retried["written"] == 1 and sorted(read_out(out)) == [1, 2] and errors(out) == []


def test_resuming_with_another_model_is_refused_in_one_line_unless_overwrite(served, tmp_path, tiny_dir):
    daemon, _ = served
    source = write_jsonl(tmp_path / "in.jsonl", texts(20))
    out = tmp_path / "out"
    job(daemon.endpoint, source, out)
    other = build_tiny_checkpoint(tmp_path / "other", TinySpec(seed=7))
    second = start_daemon(tmp_path / "second", "--embedding-model", str(other), "--reranker-model", "none")
    try:
        refused = job(second.endpoint, source, out, check=False)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "fingerprint" in refused.stderr and "--overwrite" in refused.stderr
        assert sorted(read_out(out)) == list(range(20))  # untouched
        replaced = json.loads(job(second.endpoint, source, out, "--overwrite").stdout)
        assert replaced["written"] == 20
        with second.client() as client:
            fingerprint = client.health()["embedding"]["fingerprint"]
        assert pq.read_schema(next(out.glob("part-*.parquet"))).metadata[b"qwen3vl.fingerprint"] == fingerprint.encode()
    finally:
        second.stop()


def test_resuming_with_other_settings_is_refused_naming_each(served, tmp_path):
    daemon, _ = served
    source = write_jsonl(tmp_path / "in.jsonl", texts(10))
    out = tmp_path / "out"
    job(daemon.endpoint, source, out, "--dimension", "32")
    refused = job(daemon.endpoint, source, out, "--dimension", "16", "--instruction", "Other.", check=False)
    assert refused.returncode == 1
    assert "dimension 32 (this run: 16)" in refused.stderr and "instruction None (this run: 'Other.')" in refused.stderr
    same = json.loads(job(daemon.endpoint, source, out).stdout)  # no --dimension: the dataset's is kept
    assert same["skipped"] == 10


def test_the_parquet_dataset_reads_back_with_pyarrow_with_its_settings_in_the_schema(served, tmp_path):
    daemon, _ = served
    out = tmp_path / "out"
    job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", texts(12)), out, "--dimension", "32",
        "--instruction", "Find the row.")
    table = pq.read_table(out, **READ)
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    with daemon.client() as client:
        health = client.health()
    assert meta == {"qwen3vl.fingerprint": health["embedding"]["fingerprint"],
                    "qwen3vl.model": health["embedding"]["name"], "qwen3vl.dimension": "32",
                    "qwen3vl.encoding": "float32", "qwen3vl.normalize": "true", "qwen3vl.instruction": "Find the row.",
                    "qwen3vl.id_type": "int64", "qwen3vl.columns": "id=id,text=text,image=image,video=video,input=input"}
    norms = np.linalg.norm(np.array(table.column("embedding").to_pylist()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


@pytest.mark.parametrize("encoding", ["int8", "ubinary"])
def test_compact_encodings_are_fixed_size_binary_of_the_daemons_bytes(served, tmp_path, encoding):
    daemon, _ = served
    rows = texts(10)
    out = tmp_path / "out"
    job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", rows), out, "--encoding", encoding)
    table = pq.read_table(out, **READ)
    size = 64 if encoding == "int8" else 8
    assert table.schema.field("embedding").type == pa.binary(size)
    found = read_out(out)
    expected = reference(daemon, [r["text"] for r in rows], encoding=encoding)
    assert [found[i] for i in range(10)] == [row.tobytes() for row in expected]


def test_parquet_input_with_image_bytes_and_whole_input_objects(served, tmp_path):
    daemon, media = served
    red = png_bytes((255, 0, 0))
    table = pa.table({"key": ["x", "y", "z"], "caption": ["a caption", None, None], "image": [None, red, None],
                      "input": [None, None, {"text": "a whole input", "image": str(media / "red.png")}]})
    source = tmp_path / "in.parquet"
    pq.write_table(table, source, row_group_size=2)
    out = tmp_path / "out"
    job(daemon.endpoint, source, out, "--id-column", "key", "--text-column", "caption")
    found = read_out(out)
    expected = reference(daemon, ["a caption", {"image": red}, {"text": "a whole input", "image": red}])
    np.testing.assert_allclose(np.array([found[k] for k in "xyz"]), expected, atol=1e-5)


def test_a_second_job_on_the_same_directory_is_refused(served, tmp_path):
    daemon, _ = served
    out = tmp_path / "out"
    holder = Store(out)
    holder.lock()
    try:
        refused = job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", texts(3)), out, check=False)
        assert refused.returncode == 1 and "in use by another embed-dataset job" in refused.stderr
    finally:
        holder.close()


def test_a_torn_error_line_and_temporary_files_from_a_kill_are_cleared_on_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ERRORS).write_text('{"row": 0, "id": 1, "code": "invalid_request", "message": "x"}\n{"row": 1, "id"')
    (out / ".tmp-part-000003-abc.parquet").write_bytes(b"half")
    store = Store(out)
    store.lock()
    existing = store.open(overwrite=False, retry_errors=False)
    store.close()
    assert existing.failed == {(0, 1)} and not list(out.glob(".tmp-*"))
    assert (out / ERRORS).read_text().endswith("}\n")


def test_without_a_terminal_progress_is_a_log_line_every_few_seconds():
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(total=100, done_before=10, stream=stream, clock=lambda: now[0], every_s=5.0)
    progress.advance(20, 0)
    assert stream.getvalue() == ""
    now[0] = 6.0
    progress.advance(10, 2)
    assert stream.getvalue() == "embed-dataset: 42/100 rows (42.0%), 5.3 rows/s, 2 errors, ETA 11 s\n"
    summary = progress.close("out", skipped=10)
    assert (summary.written, summary.errors, summary.skipped) == (30, 2, 10)


def test_model_options_without_ray_are_refused(served, tmp_path):
    daemon, _ = served
    refused = job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", texts(1)), tmp_path / "out", "--device", "cpu",
                  check=False)
    assert refused.returncode == 2 and "--device: model options apply with --ray" in refused.stderr


def test_a_failed_job_exits_1_and_an_unknown_model_is_named_before_any_request(served, tmp_path):
    daemon, _ = served
    refused = job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", texts(3)), tmp_path / "out", "--model", "nope",
                  check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith("qwen3vl-daemon: --model nope: the daemon serves no embedding model")
    gone = job("ipc:///nonexistent/sock", tmp_path / "in.jsonl", tmp_path / "out2", "--timeout", "1",
               "--retry-seconds", "1", check=False)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1


def test_a_column_no_row_has_is_refused_before_the_job_starts(served, tmp_path):
    daemon, _ = served
    source = write_jsonl(tmp_path / "in.jsonl", [{"key": 1, "body": "text"}, {"key": 2, "body": "more"}])
    no_id = job(daemon.endpoint, source, tmp_path / "out", "--id-column", "ID", check=False)
    assert no_id.returncode == 1 and "no row has the id column 'ID' (its columns: body, key)" in no_id.stderr
    no_input = job(daemon.endpoint, source, tmp_path / "out", "--id-column", "key", check=False)
    assert no_input.returncode == 1 and "no row has any of the columns text, image, video, input" in no_input.stderr
    assert not list((tmp_path / "out").glob("part-*"))
    assert json.loads(job(daemon.endpoint, source, tmp_path / "out", "--id-column", "key", "--text-column",
                          "body").stdout)["written"] == 2


def test_resuming_from_other_columns_is_refused(served, tmp_path):
    daemon, _ = served
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "title": "a", "body": "b"}])
    job(daemon.endpoint, source, tmp_path / "out", "--text-column", "title")
    refused = job(daemon.endpoint, source, tmp_path / "out", "--text-column", "body", check=False)
    assert refused.returncode == 1 and "columns" in refused.stderr and "text=body" in refused.stderr


def test_a_job_started_before_its_daemon_waits_for_it_and_pins_its_fingerprint(tmp_path, tiny_dir):
    endpoint = f"ipc://{tmp_path}/late/daemon.sock"
    source = write_jsonl(tmp_path / "in.jsonl", texts(5))
    waiting = subprocess.Popen([sys.executable, "-m", "daemon", "embed-dataset", str(source), "--out",
                                str(tmp_path / "out"), "--endpoint", endpoint, "--timeout", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    assert waiting.poll() is None  # still waiting for a daemon
    daemon = start_daemon(tmp_path / "late", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                          endpoint=endpoint)
    try:
        stdout, stderr = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, stderr
        assert json.loads(stdout)["written"] == 5
    finally:
        daemon.stop()


def test_on_a_terminal_the_progress_is_a_tqdm_bar_with_rows_and_errors():
    stream = io.StringIO()
    progress = Progress(total=50, done_before=0, stream=stream, bar=True)
    progress.advance(20, 1)
    progress.close("out", skipped=0)
    shown = stream.getvalue()
    assert "21/50" in shown and "rows/s" in shown and "errors=1" in shown


def test_ray_without_an_embedding_model_is_refused_before_ray_starts(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "daemon", "embed-dataset", str(write_jsonl(tmp_path / "in.jsonl",
                              texts(1))), "--out", str(tmp_path / "out"), "--ray", "local", "--embedding-model", "none"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--ray needs an embedding model" in refused.stderr


def test_the_job_sends_its_batches_at_batch_priority():
    from daemon.dataset.batches import EmbedSettings

    assert EmbedSettings().payload(["a row"])["priority"] == "batch"


def test_rows_no_request_can_carry_are_row_errors_and_the_job_goes_on(served, tmp_path):
    daemon, _ = served
    deep = '{"id": "deep", "input": ' + "[" * 10000 + "]" * 10000 + "}"  # past json's recursion limit
    daemon_too_deep = json.dumps({"id": "nest", "input": {"text": "x", "extra": json.loads("[" * 600 + "]" * 600)}})
    rows = [{"id": "a", "text": "fine"}, deep, '{"id": "s", "text": "\\ud800 a lone surrogate"}', daemon_too_deep,
            {"id": "b", "text": "fine too"}]
    out = tmp_path / "out"
    summary = json.loads(job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", rows), out).stdout)
    assert summary == {**summary, "written": 2, "errors": 3}
    assert sorted(read_out(out)) == ["a", "b"]
    found = {e["row"]: e for e in errors(out)}
    assert "nested too deep" in found[1]["message"]
    assert found[2]["id"] == "s" and found[2]["message"].startswith("input: cannot be sent")
    assert found[3]["id"] == "nest" and found[3]["code"] == "too_large" and "max_msgpack_depth" in found[3]["message"]


def test_batches_are_sized_by_bytes_as_well_as_rows_and_a_larger_row_goes_alone():
    from daemon.dataset.job import sized
    from daemon.dataset.rows import Row

    rows = [Row(i, i, {"text": "t"}, size=s) for i, s in enumerate([40, 40, 40, 500, 10, 10, 10, 10, 10])]
    batches = [[r.index for r in batch] for batch in sized(rows, 4, 100)]
    assert batches == [[0, 1], [2], [3], [4, 5, 6, 7], [8]]


def test_a_row_larger_than_the_daemon_takes_is_that_rows_too_large_and_the_rest_embed(tmp_path, tiny_dir):
    daemon = start_daemon(tmp_path / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                          "--max-message-bytes", str(1 << 20))
    try:
        rows = texts(10) + [{"id": 10000, "text": "x" * (3 << 20)}] + texts(20)[10:]
        out = tmp_path / "out"
        done = job(daemon.endpoint, write_jsonl(tmp_path / "in.jsonl", rows), out, "--timeout", "30",
                   "--retry-seconds", "10")
        assert json.loads(done.stdout) == {**json.loads(done.stdout), "written": 20, "errors": 1}
        (error,) = errors(out)
        assert error["id"] == 10000 and error["code"] == "too_large" and "max_message_bytes" in error["message"]
    finally:
        daemon.stop()


def test_an_unreadable_parquet_file_is_one_line_not_a_traceback(served, tmp_path):
    daemon, _ = served
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"id": list(range(50)), "text": [f"t{i}" for i in range(50)]}), whole)
    data = whole.read_bytes()
    for name, broken in {"truncated": data[: len(data) // 2], "no footer": data[:-8], "magic only": b"PAR1",
                         "garbled": data[:4] + bytes(len(data) - 8) + data[-4:]}.items():
        source = tmp_path / f"{name}.parquet"
        source.write_bytes(broken)
        done = job(daemon.endpoint, source, tmp_path / f"out-{name}", check=False)
        assert done.returncode == 1, (name, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, (name, done.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs takes root")
def test_a_full_disk_stops_the_job_in_one_line_and_a_resume_finishes_it(served, tmp_path):
    daemon, _ = served
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], check=True)
    try:
        source = write_jsonl(tmp_path / "in.jsonl", texts(3000))
        full = job(daemon.endpoint, source, disk / "out", "--commit-rows", "200", check=False)
        assert full.returncode == 1 and full.stderr.count("\n") == 1, full.stderr
        assert "No space left on device" in full.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        job(daemon.endpoint, source, disk / "out")
        ids = sorted(read_out(disk / "out"))
        assert ids == list(range(3000))
        assert not list((disk / "out").glob(".tmp*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
