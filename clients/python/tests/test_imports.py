"""What importing the client loads, checked in a fresh interpreter: pyzmq and msgpack, nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "torchvision", "PIL", "numpy", "daemon", "fastapi")
MODULES = ("qwen3vl_client", "qwen3vl_client.client", "qwen3vl_client.protocol", "qwen3vl_client.discovery",
           "qwen3vl_client.liveness", "qwen3vl_client.limits", "qwen3vl_client.endpoints",
           "qwen3vl_client.errors", "qwen3vl_client.inputs", "qwen3vl_client.fields")


def loaded(code: str, names: tuple[str, ...]) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps([n for n in {list(names)!r} if sys.modules.get(n) is not None]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_client_module_loads_nothing_heavy(module):
    assert loaded(f"import {module}", HEAVY) == []


def test_embedding_and_reading_a_reply_without_numpy_loads_nothing_heavy():
    code = ("from qwen3vl_client.protocol import EmbedReply, embed_request, pack, unpack\n"
            "pack(embed_request(['x']))\n"
            "body = {'embeddings': bytes(8), 'count': 1, 'dimension': 2, 'model': 'm', 'tokens': 1}\n"
            "sys.modules['numpy'] = None  # as where numpy is not installed\n"
            "assert EmbedReply.from_wire(unpack(pack(body))).embeddings == [[0.0, 0.0]]")
    assert loaded(code, HEAVY) == []


def test_the_wire_schema_loads_no_socket_library():
    # The daemon's engine and input path import the schema's values; the socket stays the server's.
    assert loaded("import qwen3vl_client.protocol, qwen3vl_client.fields", ("zmq",)) == []
    assert loaded("import qwen3vl_client.fields, qwen3vl_client.limits", ("zmq", "msgpack")) == []


def test_the_probe_sees_an_import():
    # The same probe on what does load these: a wall that could not see an import would pass by accident.
    assert loaded("import qwen3vl_client.client", ("zmq", "msgpack")) == ["zmq", "msgpack"]
    assert loaded("from qwen3vl_client import Client", ("zmq",)) == ["zmq"]


def test_the_package_names_what_it_exports():
    import qwen3vl_client

    for name in qwen3vl_client.__all__:
        assert getattr(qwen3vl_client, name) is not None, name
    with pytest.raises(AttributeError):
        qwen3vl_client.NoSuchName  # noqa: B018
