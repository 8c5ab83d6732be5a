"""qwen3vl-client: the Python client of the qwen3vl daemon, and the wire schema it speaks (PROTOCOL.md).

    from qwen3vl_client import Client
    with Client() as client:  # $QWEN3VL_ENDPOINT, else the local daemon's socket
        vectors = client.embed(["a query"]).embeddings

Its only dependencies are pyzmq and msgpack; with numpy installed, embeddings come as arrays, else as
lists of rows. The names below are loaded on first use, so that `import qwen3vl_client.protocol` (the
daemon's own import of the schema) loads no socket library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and editors see; at run time each loads on first use
    from .client import DEFAULT_TIMEOUT_S, AsyncClient, Client, CurveKeys, DaemonTimeout
    from .endpoints import client_endpoint
    from .errors import DaemonError, ErrorCode, ModelMismatch, UnknownModel
    from .fields import BATCH, INTERACTIVE, PRIORITIES
    from .limits import Limits
    from .liveness import DaemonLost, DaemonUnavailable, Heartbeat
    from .protocol import PROTOCOL_VERSION, EmbedReply, HealthReply, MetricsReply, ModelHealth, RerankReply

_EXPORTS = {
    "Client": "client", "AsyncClient": "client", "CurveKeys": "client", "DaemonTimeout": "client",
    "DEFAULT_TIMEOUT_S": "client",
    "DaemonUnavailable": "liveness", "DaemonLost": "liveness", "Heartbeat": "liveness",
    "DaemonError": "errors", "ModelMismatch": "errors", "UnknownModel": "errors", "ErrorCode": "errors",
    "EmbedReply": "protocol", "RerankReply": "protocol", "HealthReply": "protocol", "ModelHealth": "protocol",
    "MetricsReply": "protocol", "PROTOCOL_VERSION": "protocol",
    "INTERACTIVE": "fields", "BATCH": "fields", "PRIORITIES": "fields",
    "Limits": "limits", "client_endpoint": "endpoints",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
