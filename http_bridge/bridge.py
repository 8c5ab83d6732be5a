"""The HTTP face of the daemon: the old sidecar's `/embed`, `/rerank`, `/health` contract on :8421,
plus multimodal inputs, an OpenAI-compatible `/v1/embeddings` and Prometheus `/metrics`.

It holds no model: every route is one request to the daemon over its socket, with many in flight at
once on one asyncio client. Modules: `schemas` (bodies), `routes`, `errors` (one error type),
`metrics`, `guard` (slow and oversized clients), `cli` (`qwen3vl-bridge`).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen3vl_client import __version__
from qwen3vl_client.client import AsyncClient, CurveKeys

from .errors import HTTP_ERROR_CODES, INVALID_STATUS, BridgeError, error_response
from .guard import BodyGuard
from .metrics import BridgeMetrics, Measure
from .routes import DaemonGateway, build_router
from .schemas import _union_tag


@dataclass(frozen=True)
class BridgeConfig:
    endpoint: str
    host: str = "127.0.0.1"
    port: int = 8421
    token: str | None = None  # bearer token required on every route but /health when set
    max_body_bytes: int = 64 * 1024 * 1024
    timeout_s: float = 120.0  # a daemon reply slower than this is a 504
    body_timeout_s: float | None = 60.0  # a request body slower than this to arrive is a 408
    header_timeout_s: float = 10.0  # a connection whose request headers take longer is closed
    limit_concurrency: int = 1024  # connections; beyond: 503 at once
    curve: CurveKeys | None = None  # for a tcp:// daemon endpoint with CURVE
    health_timeout_s: float = 5.0  # /health waits at most this (or timeout_s, when shorter)


UNAUTHORIZED = BridgeError(401, "unauthorized", "missing or wrong bearer token")


def create_app(config: BridgeConfig):
    app = FastAPI(title="qwen3vl-daemon HTTP bridge", version=__version__,
                  description="Qwen3-VL embeddings and reranking over HTTP, through the qwen3vl daemon.")
    client = AsyncClient(config.endpoint, timeout=config.timeout_s, curve=config.curve)
    metrics = BridgeMetrics()
    bearer = HTTPBearer(auto_error=False)

    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), config.token.encode()):
            raise UNAUTHORIZED

    @app.exception_handler(BridgeError)
    async def _bridge_error(_request: Request, exc: BridgeError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        # For a union (a string or an input object), the deepest error names the field that is wrong.
        errors = exc.errors() or [{"loc": (), "msg": "invalid body"}]
        worst = max(errors, key=lambda e: len(e.get("loc", ())))
        where = ".".join(str(p) for p in worst.get("loc", ()) if p != "body" and not _union_tag(p))
        return error_response(INVALID_STATUS, "invalid_request", f"{where or 'body'}: {worst.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        # FastAPI's own refusals (a body it cannot parse, an unknown route) in the bridge's error shape.
        if exc.status_code == 400:  # a body its parser gave up on (nested too deeply): as any body that is not JSON
            return error_response(INVALID_STATUS, "invalid_request", f"body: {exc.detail}")
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    app.include_router(build_router(DaemonGateway(client), metrics, authorized,
                                    min(config.health_timeout_s, config.timeout_s)))

    @app.on_event("shutdown")
    async def _close():
        await client.close()

    app.state.config = config
    app.state.metrics = metrics
    return BodyGuard(Measure(app, metrics), config.max_body_bytes or None, config.body_timeout_s)
