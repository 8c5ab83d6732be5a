"""Deprecated: the Python clients are their own distribution now, `qwen3vl-client` (the package
`qwen3vl_client`, in clients/python/), which needs no torch. This module re-exports it for one release
so that `from daemon.client import Client` keeps working; it is removed in the next."""

import warnings

from qwen3vl_client import client as _client
from qwen3vl_client.client import *  # noqa: F401,F403 (the public names)

warnings.warn("daemon.client is deprecated and goes in the next release: import from qwen3vl_client "
              "(pip install ./clients/python)", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    """Every other name the module had (DEFAULT_TIMEOUT_S, split_endpoints, ...)."""
    return getattr(_client, name)
