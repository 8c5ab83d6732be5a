"""The bridge's one error type, and how daemon error codes map to HTTP statuses."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from daemon.protocol import ErrorCode

# FastAPI's own refusals (unparseable body, unknown route, wrong method) as error codes.
HTTP_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
# Daemon error codes as HTTP statuses.
STATUS_BY_CODE = {ErrorCode.INVALID_REQUEST: 400, ErrorCode.UNSUPPORTED: 400, ErrorCode.INPUT_ERROR: 422,
                  ErrorCode.TOO_LARGE: 413, ErrorCode.OVERLOADED: 429, ErrorCode.NOT_LOADED: 503,
                  ErrorCode.SHUTTING_DOWN: 503, ErrorCode.DEADLINE_EXCEEDED: 504, ErrorCode.INTERNAL: 500,
                  ErrorCode.MODEL_MISMATCH: 409}


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
        return cls(status, code, message, details)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.details)


def error_response(status: int, code: str, message: str, details: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {**(details or {}), "code": code, "message": message}}, status_code=status)
