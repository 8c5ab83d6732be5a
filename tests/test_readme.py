"""The README's "Using it" commands work as written, against a daemon started as the README says."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import png_bytes
from conftest import start_daemon

README = Path(__file__).resolve().parents[1] / "README.md"


def using_it_commands() -> list[str]:
    """The shell block after 'Then, in that shell' in the 'Using it' section."""
    text = README.read_text()
    section = text[text.index("## Using it"):]
    block = re.search(r"Then, in that shell.*?```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_activates_the_venv_before_its_examples():
    text = README.read_text()
    section = text[text.index("## Using it"):]
    assert section.index(". .venv/bin/activate") < section.index("qwen3vl-daemon health")


@pytest.fixture(scope="module")
def readme_daemon(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("readme")
    proc = start_daemon(tmp, "--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir))
    yield proc
    proc.stop()


@pytest.mark.parametrize("command", using_it_commands())
def test_each_example_runs_as_written(readme_daemon, media_dir, tmp_path, command):
    (tmp_path / "photo.jpg").write_bytes(png_bytes(size=(64, 48)))  # any image file the user has
    (tmp_path / "clip.mp4").write_bytes((media_dir / "clip.mp4").read_bytes())
    for name in ("f1.png", "f2.png"):
        (tmp_path / name).write_bytes(png_bytes(size=(32, 32)))
    argv = shlex.split(command)
    assert argv[0] == "qwen3vl-daemon"
    bin_dir = str(Path(sys.executable).parent)  # the activated venv's PATH entry
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "QWEN3VL_ENDPOINT": readme_daemon.endpoint}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("{")
