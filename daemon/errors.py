"""The daemon's own errors: a model that cannot load, and the one-line messages the load path gives.
The wire protocol's error codes and `RequestError` are the client package's (qwen3vl_client.errors)."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model could not be loaded; the message is one line an operator can act on."""


def first_line(exc: BaseException) -> str:
    """What an exception says, in one line (its type's name when it says nothing), for ModelLoadError."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def attempt(fn, *args):
    """fn(*args), or the exception it raised: where one input's failure is that input's result."""
    try:
        return fn(*args)
    except Exception as exc:
        return exc
