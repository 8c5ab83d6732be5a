"""deploy/container/Containerfile, checked where it cannot be built (no image registry is reachable
from CI): it parses, every file it copies exists, it installs with the README's script, it runs as a
non-root user the manifests agree with, and its entrypoint and default command are the daemon's CLI."""

from __future__ import annotations

import io
import json
import os
import shlex
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
