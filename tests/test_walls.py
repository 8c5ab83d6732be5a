"""Walls between the layers, checked in a fresh interpreter: what importing a module loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "PIL")


def loaded(module: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` are in sys.modules after importing `module` alone."""
    code = f"import json, sys, {module}; print(json.dumps([n for n in {list(names)!r} if n in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module, forbidden", [
    ("daemon.models", ("zmq", "msgpack")),
    ("daemon.inputs.media.batch", ("zmq", "msgpack")),
    ("daemon.inputs.media.video", ("zmq", "msgpack")),
    ("daemon.bounded", ("zmq", "msgpack", "numpy")),
    ("daemon.engine.engine", ("zmq", "msgpack")),
    ("daemon.engine.backends", ("zmq", "msgpack")),
    ("daemon.handlers", ("zmq",)),
    ("qwen3vl_client.client", HEAVY),
    ("qwen3vl_client.protocol", HEAVY + ("zmq",)),
    ("http_bridge.bridge", HEAVY),
    ("http_bridge.cli", HEAVY),
])
def test_a_layer_imports_nothing_from_beyond_its_wall(module, forbidden):
    assert loaded(module, forbidden) == []


def test_the_probe_sees_what_a_module_does_import():
    # The same probe on modules that do load these: a wall test that cannot see an import would pass
    # by accident.
    assert loaded("daemon.serving.server", ("zmq", "msgpack")) == ["zmq", "msgpack"]
    assert loaded("PIL.Image", HEAVY) == ["PIL"]
