"""The wire protocol's error codes, the error a daemon answers with (`RequestError`, its side), and
the exceptions a client raises for one (`DaemonError` and its kinds)."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    INVALID_REQUEST = "invalid_request"  # malformed payload, unknown field value, wrong type
    UNSUPPORTED = "unsupported"  # a well-formed request the daemon does not do (unknown op, disabled feature)
    NOT_LOADED = "not_loaded"  # the model the op needs is disabled or still loading
    INPUT_ERROR = "input_error"  # an input could not be used (corrupt image, unreadable video, too long)
    TOO_LARGE = "too_large"  # a configured limit was exceeded
    OVERLOADED = "overloaded"  # the queue is full; retry later
    SHUTTING_DOWN = "shutting_down"  # the daemon is draining and takes no new work
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline_ms passed before its work was done
    INTERNAL = "internal"  # a fault inside the daemon (forward failed, non-finite output)
    MODEL_MISMATCH = "model_mismatch"  # the request's expect_fingerprint is not the loaded model's
    UNKNOWN_MODEL = "unknown_model"  # the request's `model` names no model this daemon serves


class RequestError(Exception):
    """Fails one request with a protocol error code; the message names the field and input index."""

    def __init__(self, code: ErrorCode, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}  # extra fields of the error map (model_mismatch: expected, actual)

    def to_wire(self) -> dict:
        return {**self.details, "code": self.code.value, "message": self.message}


def invalid(message: str) -> RequestError:
    return RequestError(ErrorCode.INVALID_REQUEST, message)


def input_error(message: str) -> RequestError:
    return RequestError(ErrorCode.INPUT_ERROR, message)


def too_large(message: str) -> RequestError:
    return RequestError(ErrorCode.TOO_LARGE, message)


def internal_error(exc: Exception) -> RequestError:
    """A bug's exception as the one request's `internal` error (its type and the start of its message)."""
    return RequestError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {str(exc)[:160]}")


def model_mismatch(kind: str, expected: str, actual: str | None) -> RequestError:
    return RequestError(ErrorCode.MODEL_MISMATCH,
                        f"expect_fingerprint: the request expects the {kind} model {expected}, "
                        f"this daemon serves {actual}", {"expected": expected, "actual": actual})


class DaemonError(Exception):
    """The daemon answered with an error; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class UnknownModel(DaemonError):
    """`unknown_model`: the request's `model` names no model the daemon serves (`served` lists them)."""

    def __init__(self, message: str, model: str | None, served: list[str]):
        super().__init__(ErrorCode.UNKNOWN_MODEL.value, message)
        self.model, self.served = model, served


class ModelMismatch(DaemonError):
    """`model_mismatch`: the daemon serves another model than the request's expect_fingerprint."""

    def __init__(self, message: str, expected: str | None, actual: str | None):
        super().__init__(ErrorCode.MODEL_MISMATCH.value, message)
        self.expected, self.actual = expected, actual
