"""Walls between the layers: what importing a module loads, checked in a fresh interpreter; and the
import graph of daemon/, http_bridge/ and the client package, read from their source: no circle, and
every import goes down the rooms in the order a request's data flows back up them."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "PIL")
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"daemon": ROOT / "daemon", "http_bridge": ROOT / "http_bridge",
            "qwen3vl_client": ROOT / "clients" / "python" / "qwen3vl_client"}

# The rooms from the bottom up: a module imports only from its own room or from those below it. A
# request comes in at the socket (serving), is decoded by the wire schema (the client package), goes to
# its handler, then the engine, a backend and its model (fed by the input path and the loaded weights),
# and its result goes back up through the handler's encoding to the socket.
ROOMS = [
    ("qwen3vl_client",),
    ("daemon", "daemon.config", "daemon.errors", "daemon.bounded", "daemon.logs", "daemon.client"),
    ("daemon.inputs",),
    ("daemon.loading",),
    ("daemon.models",),
    ("daemon.outputs",),
    ("daemon.engine",),
    ("daemon.handlers",),
    ("daemon.core",),
    ("daemon.serving",),
    ("daemon.dataset",),
    ("daemon.commands",),
    ("daemon.main", "daemon.__main__"),
]
# The bridge is a client: it may import the client package and nothing of the daemon.
BRIDGE_MAY_IMPORT = ("http_bridge", "qwen3vl_client")


def loaded(module: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` are in sys.modules after importing `module` alone."""
    code = f"import json, sys, {module}; print(json.dumps([n for n in {list(names)!r} if n in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module, forbidden", [
    ("daemon.models", ("zmq", "msgpack")),
    ("daemon.inputs.media.batch", ("zmq", "msgpack")),
    ("daemon.inputs.media.video", ("zmq", "msgpack")),
    ("daemon.inputs.media_reader", ("zmq", "msgpack")),
    ("daemon.bounded", ("zmq", "msgpack", "numpy")),
    ("daemon.engine.engine", ("zmq", "msgpack")),
    ("daemon.engine.backends", ("zmq", "msgpack")),
    ("daemon.handlers", ("zmq",)),
    ("daemon.core", ("zmq",)),
    ("qwen3vl_client.client", HEAVY + ("numpy",)),
    ("qwen3vl_client.protocol", HEAVY + ("zmq", "numpy")),
    ("http_bridge.bridge", HEAVY + ("numpy", "daemon")),
    ("http_bridge.cli", HEAVY + ("numpy", "daemon")),
])
def test_a_layer_imports_nothing_from_beyond_its_wall(module, forbidden):
    assert loaded(module, forbidden) == []


def test_the_probe_sees_what_a_module_does_import():
    # The same probe on modules that do load these: a wall test that cannot see an import would pass
    # by accident.
    assert loaded("daemon.serving.server", ("zmq", "msgpack")) == ["zmq", "msgpack"]
    assert loaded("PIL.Image", HEAVY) == ["PIL"]


def modules() -> dict[str, Path]:
    found = {}
    for package, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports, at its top or inside a function (a lazy import is an
    import all the same)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def room_of(module: str) -> int:
    for level, rooms in enumerate(ROOMS):
        if any(module == room or module.startswith(room + ".") for room in rooms if room != "daemon"):
            return level
    if module == "daemon":
        return 1
    raise AssertionError(f"{module} is in no room: add it to ROOMS")


def test_the_import_graph_has_no_circle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(target):] + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = 2
    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_every_daemon_import_goes_down_the_rooms(graph):
    upward = [f"{module} ({room_of(module)}) imports {target} ({room_of(target)})"
              for module, targets in graph.items() if not module.startswith("http_bridge")
              for target in targets if room_of(target) > room_of(module)]
    assert upward == []


def test_the_bridge_and_the_client_import_nothing_of_the_daemon(graph):
    bridge = {t for m, ts in graph.items() if m.startswith("http_bridge") for t in ts}
    client = {t for m, ts in graph.items() if m.startswith("qwen3vl_client") for t in ts}
    assert {t for t in bridge if not t.startswith(BRIDGE_MAY_IMPORT)} == set()
    assert {t for t in client if not t.startswith("qwen3vl_client")} == set()


def test_no_module_imports_by_a_name_computed_at_run_time():
    # importlib.import_module and __import__ would pass under the graph above unseen. The one use is
    # the client package's lazy exports, which load its own modules by their names.
    dynamic = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = getattr(node, "attr", None) or getattr(node, "id", None)
            if isinstance(node, (ast.Attribute, ast.Name)) and name in ("import_module", "__import__"):
                dynamic.append(module)
    assert sorted(dynamic) == ["qwen3vl_client"]


def test_the_rules_catch_an_import_that_goes_up():
    # The same rules on a made-up edge, so that a room table that matched nothing could not pass.
    assert room_of("daemon.engine.engine") > room_of("daemon.models") > room_of("daemon.inputs.media.video")
    assert room_of("daemon.serving.server") > room_of("daemon.core") > room_of("daemon.handlers")


def test_the_old_client_import_still_works_and_says_where_it_went():
    import qwen3vl_client.client

    sys.modules.pop("daemon.client", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from daemon.client import DEFAULT_TIMEOUT_S, AsyncClient, Client, CurveKeys, DaemonError
    assert (Client, AsyncClient, CurveKeys, DaemonError) == (
        qwen3vl_client.client.Client, qwen3vl_client.client.AsyncClient, qwen3vl_client.client.CurveKeys,
        qwen3vl_client.client.DaemonError)
    assert DEFAULT_TIMEOUT_S == qwen3vl_client.client.DEFAULT_TIMEOUT_S
    assert any(issubclass(w.category, DeprecationWarning) and "qwen3vl_client" in str(w.message) for w in caught)


def test_the_daemon_and_its_client_are_released_together():
    import daemon
    import qwen3vl_client

    assert daemon.__version__ == qwen3vl_client.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"qwen3vl-client[prometheus]=={qwen3vl_client.__version__}"' in pyproject
