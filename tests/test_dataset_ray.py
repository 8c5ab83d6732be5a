"""embed-dataset --ray local: a Ray of this machine's own (2 CPUs, no dashboard, no usage stats) runs
the job with the tiny model in its actors, and writes what the local mode writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import start_daemon
from test_dataset import READ, errors, job, read_out, texts, write_jsonl

pytest.importorskip("ray")

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}  # local: the machine's own CPUs (2 in CI)


def test_ray_local_writes_the_same_ids_vectors_and_errors_as_the_local_mode(tmp_path, tiny_dir, monkeypatch):
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    rows = texts(60) + [{"id": 100, "text": ""}, {"id": 3, "text": "duplicate"}, "not json",
                        {"id": 101, "image": "/nope.png"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    daemon = start_daemon(tmp_path / "daemon", "--embedding-model", str(tiny_dir), "--reranker-model", "none")
    try:
        job(daemon.endpoint, source, tmp_path / "local")
    finally:
        daemon.stop()
    done = job("ipc:///nonexistent", source, tmp_path / "ray", "--ray", "local", "--embedding-model", str(tiny_dir),
               "--device", "cpu", "--dtype", "float32", "--no-warmup", "--batch-rows", "16")
    summary = json.loads(done.stdout)
    assert (summary["written"], summary["errors"]) == (60, 4)
    local, ray = read_out(tmp_path / "local"), read_out(tmp_path / "ray")
    assert sorted(ray) == sorted(local) == list(range(60))
    np.testing.assert_allclose(np.array([ray[i] for i in range(60)]), np.array([local[i] for i in range(60)]),
                               atol=1e-5)
    by_row = lambda out: sorted(errors(out), key=lambda e: e["row"])  # noqa: E731
    assert by_row(tmp_path / "ray") == by_row(tmp_path / "local")
    meta = lambda out: pq.read_schema(next(out.glob("part-*.parquet"))).metadata  # noqa: E731
    assert meta(tmp_path / "ray") == meta(tmp_path / "local")
    # A rerun resumes: nothing is left to do, so no Ray starts.
    again = json.loads(job("ipc:///nonexistent", source, tmp_path / "ray", "--ray", "local", "--embedding-model",
                           str(tiny_dir), "--device", "cpu").stdout)
    assert again["written"] == 0 and again["skipped"] == 64
    assert len(pq.read_table(tmp_path / "ray", **READ)) == 60
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
