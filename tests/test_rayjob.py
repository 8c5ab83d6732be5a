"""deploy/ray: the RayJob's entrypoint is a command embed-dataset takes, on the Ray this project pins."""

from __future__ import annotations

import io
import re
import shlex
import tomllib
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

from daemon.commands.dataset import embed_dataset

ROOT = Path(__file__).resolve().parent.parent
RAY = ROOT / "deploy" / "ray"


def pinned_ray() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    return re.search(r"ray\[data\]==([\d.]+)", " ".join(extras)).group(1)


def test_the_rayjob_runs_embed_dataset_on_the_pinned_ray_with_one_gpu_per_worker(tmp_path):
    job = yaml.safe_load((RAY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["qwen3vl-daemon", "embed-dataset"]
    assert words[2] == "/data/store/rows.parquet"
    (tmp_path / "rows.parquet").touch()  # INPUT must exist where the job runs: here, a stand-in
    options = embed_dataset.make_context("embed-dataset", [str(tmp_path / "rows.parquet"), *words[3:]]).params
    assert options["ray_address"] == "auto" and options["embedding_models"] == ("Qwen/Qwen3-VL-Embedding-2B",)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned_ray()
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_ray_image_starts_from_the_pinned_rays_own_image():
    parsed = DockerfileParser(fileobj=io.BytesIO((RAY / "Containerfile").read_bytes()), env_replace=True)
    assert parsed.baseimage.startswith(f"docker.io/rayproject/ray:{pinned_ray()}-py311")
    assert "-c constraints.txt" in parsed.content and "[dataset,ray" in parsed.content
