"""deploy/container/Containerfile, checked where it cannot be built (no image registry is reachable
from CI): it parses, every file it copies exists, it installs with the README's script, it runs as a
non-root user the manifests agree with, and its entrypoint and default command are the daemon's CLI."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from daemon.main import cli

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"


@pytest.fixture(scope="module")
def parsed() -> DockerfileParser:
    # A file object: given a path, the parser would look for a file named Dockerfile in it.
    parser = DockerfileParser(fileobj=io.BytesIO(CONTAINERFILE.read_bytes()), env_replace=True)
    assert parser.structure, "the Containerfile parses to no instruction"
    return parser


def instructions(parsed: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parsed.structure if i["instruction"] == name]


def exec_form(value: str) -> list[str]:
    form = json.loads(value)
    assert isinstance(form, list) and all(isinstance(a, str) for a in form), value
    return form


def test_it_builds_from_a_python_of_the_projects_range_with_a_cpu_or_cuda_variant(parsed):
    (base,) = instructions(parsed, "FROM")
    assert base == "${BASE}"
    args = dict(a.split("=", 1) for a in instructions(parsed, "ARG") if "=" in a)
    assert "python:3.11" in args["BASE"] and args["VARIANT"] == "cpu"
    run = " ".join(instructions(parsed, "RUN"))
    assert "cpu)" in run and "cuda)" in run  # both variants, anything else refused


def test_every_file_it_copies_exists_in_the_checkout(parsed):
    copies = instructions(parsed, "COPY")
    assert copies and not instructions(parsed, "ADD")  # no ADD: nothing fetched from a URL at build time
    for value in copies:
        *sources, _dest = shlex.split(value)
        for source in sources:
            assert not source.startswith("--"), "no --from or --chown: plain copies from the checkout"
            assert (ROOT / source).exists(), source


def test_it_installs_with_the_readmes_own_script_without_the_test_tools(parsed):
    assert any("bash scripts/setup.sh" in run for run in instructions(parsed, "RUN"))
    assert "scripts/setup.sh" in (ROOT / "README.md").read_text()
    assert parsed.envs["QWEN3VL_EXTRAS"] == "bridge,quant"
    assert "QWEN3VL_EXTRAS" in (ROOT / "scripts" / "setup.sh").read_text()
    assert parsed.envs["VENV"] + "/bin" in parsed.envs["PATH"].split(":")  # where setup.sh puts the CLIs


def test_it_runs_as_the_non_root_user_the_manifests_run_as(parsed):
    (user,) = instructions(parsed, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    for name in ("daemon.yaml", "bridge.yaml"):
        for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "base" / name).read_text()):
            if doc["kind"] in ("StatefulSet", "Deployment"):
                assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid), name


def test_its_entrypoint_is_the_daemons_cli_serving_in_the_foreground_with_logs_on_stdout(parsed):
    (entrypoint,) = instructions(parsed, "ENTRYPOINT")
    assert exec_form(entrypoint) == ["qwen3vl-daemon"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'qwen3vl-daemon = "daemon.main:main"' in pyproject and 'qwen3vl-bridge = "http_bridge.cli:main"' in pyproject
    (cmd,) = instructions(parsed, "CMD")
    args = exec_form(cmd)
    assert args[0] == "serve"
    assert parsed.envs["QWEN3VL_LOG_STREAM"] == "stdout"
    # The default command is one `serve` accepts, with the image's environment.
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in parsed.envs.items() if k.startswith(("QWEN3VL_", "HF_"))})
    try:
        serve = cli.get_command(None, "serve")
        ctx = serve.make_context("serve", args[1:])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert ctx.params["endpoint"] == "tcp://0.0.0.0:5555" and ctx.params["log_stream"] == "stdout"
    assert ctx.params["metrics_address"] == "0.0.0.0:9464"


def test_the_model_cache_is_a_volume_outside_the_read_only_root(parsed):
    volumes = [v for value in instructions(parsed, "VOLUME") for v in exec_form(value)]
    assert volumes == ["/var/cache/qwen3vl"]
    assert parsed.envs["HF_HOME"].startswith("/var/cache/qwen3vl/")
    assert parsed.envs["QWEN3VL_FINGERPRINT_CACHE"].startswith("/var/cache/qwen3vl/")


def test_the_build_context_leaves_out_the_environment_and_build_outputs():
    for name in (".containerignore", ".dockerignore"):
        ignored = (ROOT / name).read_text().split()
        assert {".venv", ".git", "clients/rust/target"} <= set(ignored), name


# -- the bridge's slim image (deploy/container/bridge.Containerfile) ---------------------------------
BRIDGE_CONTAINERFILE = ROOT / "deploy" / "container" / "bridge.Containerfile"
BRIDGE_REQUIREMENTS = ROOT / "deploy" / "container" / "bridge.requirements.txt"
NOT_IN_THE_BRIDGE = {"torch", "torchvision", "torchcodec", "transformers", "numpy", "pillow", "qwen-vl-utils",
                     "qwen3vl-daemon", "accelerate", "safetensors", "huggingface-hub"}


@pytest.fixture(scope="module")
def bridge_parsed() -> DockerfileParser:
    parser = DockerfileParser(fileobj=io.BytesIO(BRIDGE_CONTAINERFILE.read_bytes()), env_replace=True)
    assert parser.structure, "the bridge's Containerfile parses to no instruction"
    return parser


def pins() -> dict[str, str]:
    found = {}
    for line in BRIDGE_REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{line}: every requirement is pinned with =="
            found[canonical(name)] = version
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_bridge_image_copies_only_the_bridge_and_the_client(bridge_parsed):
    copied = [shlex.split(value)[0] for value in instructions(bridge_parsed, "COPY")]
    assert sorted(copied) == ["clients/python/qwen3vl_client/", "deploy/container/bridge.requirements.txt",
                              "http_bridge/"]
    assert all((ROOT / source).exists() for source in copied) and not instructions(bridge_parsed, "ADD")
    (base,) = instructions(bridge_parsed, "FROM")
    args = dict(a.split("=", 1) for a in instructions(bridge_parsed, "ARG") if "=" in a)
    assert base == "${BASE}" and "python:3.11" in args["BASE"] and "slim" in args["BASE"]


def test_the_bridge_image_installs_its_pinned_set_alone_and_refuses_torch(bridge_parsed):
    (run,) = instructions(bridge_parsed, "RUN")
    assert "pip install --no-deps --no-compile -r bridge.requirements.txt;" in run and "pip check" in run
    assert bridge_parsed.envs["PYTHONPATH"] == "/opt/qwen3vl"  # the bridge and the client run from their folders
    assert "import torch" in run and "import numpy" in run  # the build fails if either came in


def test_the_bridge_requirements_are_pinned_to_what_ci_tests_and_carry_no_torch():
    constraints = {canonical(name): version for name, _, version in
                   (line.partition("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                    if "==" in line and not line.startswith("#"))}
    found = pins()
    assert {"fastapi", "uvicorn", "pyzmq", "msgpack", "prometheus-client"} <= set(found)
    assert set(found) & NOT_IN_THE_BRIDGE == set()
    assert {name: version for name, version in found.items() if constraints.get(name) != version} == {}


def test_the_bridge_requirements_are_complete(bridge_parsed):
    # --no-deps installs nothing beyond the list: every requirement of the client and of every listed
    # package (their metadata, at the pinned versions this environment has) is listed too.
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    found = pins()
    client = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]
    needed = [Requirement(r) for r in client["dependencies"] + client["optional-dependencies"]["prometheus"]]
    for name in found:
        assert distribution(name).version == found[name], name
        needed += [Requirement(r) for r in distribution(name).requires or []]
    missing = {canonical(r.name) for r in needed
               if (r.marker is None or r.marker.evaluate({"extra": ""})) and canonical(r.name) not in found}
    assert missing == set()


def test_the_bridge_image_runs_the_bridge_as_the_user_the_deployment_runs_as(bridge_parsed):
    (entrypoint,) = instructions(bridge_parsed, "ENTRYPOINT")
    assert exec_form(entrypoint) == ["qwen3vl-bridge"]
    assert "from http_bridge.cli import main" in " ".join(instructions(bridge_parsed, "RUN"))
    (user,) = instructions(bridge_parsed, "USER")
    (doc,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "base" / "bridge.yaml").read_text())
              if d["kind"] == "Deployment"]
    pod = doc["spec"]["template"]["spec"]
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    (container,) = pod["containers"]
    assert container["image"] == "qwen3vl-bridge" and container["command"] == ["qwen3vl-bridge"]


def test_the_readme_states_the_bridge_images_size_from_its_wheels():
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"bridge image[^.]*{len(pins())} wheels", readme), "README: the slim bridge image's size"
