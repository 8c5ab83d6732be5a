"""The bridge's one error type, and how daemon error codes map to HTTP statuses."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from qwen3vl_client.protocol import ErrorCode

# FastAPI's own refusals (unknown route, wrong method) as error codes; its 400 (a body it could not
# parse) is answered as invalid_request.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}
# Each error code has one status on every route, whoever finds the error (the bridge's schema, the
# bridge, or the daemon): invalid_request is 422, as FastAPI (the sidecar this bridge replaces)
# answered a body it would not take; unsupported (a valid request for what is not offered) is 400.
INVALID_STATUS = 422
UNSUPPORTED_STATUS = 400
MODEL_NOT_FOUND = "model_not_found"  # a `model` the daemon does not serve (its unknown_model): OpenAI's 404 code
STATUS_BY_CODE = {ErrorCode.INVALID_REQUEST: INVALID_STATUS, ErrorCode.UNSUPPORTED: UNSUPPORTED_STATUS,
                  ErrorCode.INPUT_ERROR: 422,
                  ErrorCode.TOO_LARGE: 413, ErrorCode.OVERLOADED: 429, ErrorCode.NOT_LOADED: 503,
                  ErrorCode.SHUTTING_DOWN: 503, ErrorCode.DEADLINE_EXCEEDED: 504, ErrorCode.INTERNAL: 500,
                  ErrorCode.MODEL_MISMATCH: 409, ErrorCode.UNKNOWN_MODEL: 404}


def invalid_request(message: str) -> "BridgeError":
    return BridgeError(INVALID_STATUS, ErrorCode.INVALID_REQUEST.value, message)


class BridgeError(Exception):
    """Any failure of a route, answered as `{"error": {"code", "message", ...details}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}  # the daemon's extra error fields (model_mismatch: expected, actual)

    @classmethod
    def from_daemon(cls, code: str, message: str, details: dict | None = None) -> "BridgeError":
        try:
            status = STATUS_BY_CODE[ErrorCode(code)]
        except ValueError:  # a code this bridge does not know (a newer daemon)
            status = 500
        if code == ErrorCode.UNKNOWN_MODEL.value:
            code = MODEL_NOT_FOUND  # what the OpenAI and Cohere SDKs know a missing model by
        return cls(status, code, message, details)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.details)


def error_response(status: int, code: str, message: str, details: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {**(details or {}), "code": code, "message": message}}, status_code=status)
