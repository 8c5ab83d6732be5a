"""The HTTP face of the daemon: the old sidecar's `/embed`, `/rerank`, `/health` contract on :8421,
plus multimodal inputs, an OpenAI-compatible `/v1/embeddings` and Prometheus `/metrics`.

It holds no model: every route is one request to the daemon over its socket, with many in flight at
once on one asyncio client. Run it with `qwen3vl-bridge`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import click
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from daemon import __version__
from daemon.client import AsyncClient, CurveKeys, DaemonTimeout, DaemonUnavailable, embed_result, rerank_result
from daemon.config import client_endpoint

from .guard import BodyGuard, header_timeout_protocol

# FastAPI's own refusals (unparseable body, unknown route, wrong method) as error codes.
HTTP_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
# Daemon error codes as HTTP statuses.
STATUS_BY_CODE = {"invalid_request": 400, "unsupported": 400, "input_error": 422, "too_large": 413,
                  "overloaded": 429, "not_loaded": 503, "shutting_down": 503, "deadline_exceeded": 504,
                  "internal": 500}


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


# -- request and response bodies -------------------------------------------------------------------
MediaRef = Union[str, dict[str, str]]  # data URL or base64 string; or {"path": ...} / {"url": ...}


class InputObject(BaseModel):
    """One input: texts, images and videos, as the daemon's protocol defines them."""

    model_config = ConfigDict(extra="forbid")
    text: str | list[str] | None = None
    image: MediaRef | list[MediaRef] | None = Field(
        None, description="Data URL or base64 of an encoded image, or {\"path\"} / {\"url\"} (operator-allowed)")
    video: dict[str, Any] | list[dict[str, Any]] | None = Field(
        None, description="{\"frames\": [image, ...]}, {\"data\": data URL of a video file}, {\"path\"} or {\"url\"}")
    instruction: str | None = None
    fps: float | None = Field(None, ge=0.01, le=60)  # the daemon's range
    max_frames: int | None = Field(None, ge=2, le=768)


class EmbedBody(BaseModel):
    texts: list[str] | None = Field(None, description="Texts to embed (the sidecar contract)")
    inputs: list[Union[str, InputObject]] | None = Field(None, description="Multimodal inputs instead of texts")
    instruction: str | None = None
    dimension: int | None = Field(None, ge=1)
    normalize: bool = True


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int
    model: str


class RerankBody(BaseModel):
    query: Union[str, InputObject]
    documents: list[Union[str, InputObject]]
    instruction: str | None = None


class RerankResponse(BaseModel):
    scores: list[float] = Field(description="One score in (0, 1) per document, in document order")
    model: str


class HealthResponse(BaseModel):
    status: str
    embedding_model: str | None = None
    reranker_model: str | None = None
    embedding_loaded: bool = False
    reranker_loaded: bool = False
    device: str | None = None
    embedding_dim: int | None = None


class OpenAIEmbeddingsBody(BaseModel):
    input: str | list[str]
    model: str | None = None
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 408, 413, 422, 429, 500, 503, 504)}


# -- conversions -----------------------------------------------------------------------------------
class BadInput(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _decode_b64(value: str, where: str) -> bytes:
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{where}: not a data URL or base64 string") from None


def _media(value: MediaRef, where: str) -> Any:
    if isinstance(value, str):
        return _decode_b64(value, where)
    if len(value) == 1 and next(iter(value)) in ("path", "url"):
        return dict(value)
    raise BadInput(f"{where}: expected a data URL, base64, {{\"path\"}} or {{\"url\"}}")


def _video(value: dict[str, Any], where: str) -> Any:
    """One video in the protocol's list-of-videos form: a frame list, or a file map."""
    if set(value) == {"frames"} and isinstance(value["frames"], list) and value["frames"]:
        return [_media(f, f"{where}.frames[{i}]") for i, f in enumerate(value["frames"])]
    if set(value) == {"data"} and isinstance(value["data"], str):
        return {"data": _decode_b64(value["data"], f"{where}.data")}
    if len(value) == 1 and next(iter(value)) in ("path", "url") and isinstance(next(iter(value.values())), str):
        return dict(value)
    raise BadInput(f"{where}: expected {{\"frames\": [...]}}, {{\"data\": ...}}, {{\"path\"}} or {{\"url\"}}")


def to_protocol_input(value: Union[str, InputObject], where: str) -> Any:
    if isinstance(value, str):
        return value
    out: dict[str, Any] = {}
    if value.text is not None:
        out["text"] = value.text
    if value.image is not None:
        images = value.image if isinstance(value.image, list) else [value.image]
        out["image"] = [_media(img, f"{where}.image[{i}]") for i, img in enumerate(images)]
    if value.video is not None:
        videos = value.video if isinstance(value.video, list) else [value.video]
        out["video"] = [_video(v, f"{where}.video[{i}]") for i, v in enumerate(videos)]
    for key in ("instruction", "fps", "max_frames"):
        if getattr(value, key) is not None:
            out[key] = getattr(value, key)
    return out


def _union_tag(part: Any) -> bool:
    """A location part that names a union's branch (str, InputObject, list[...]), not a field."""
    return isinstance(part, str) and (part[:1].isupper() or part in ("str", "int", "float", "bool")
                                      or "[" in part or "-" in part)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


# -- metrics ---------------------------------------------------------------------------------------
class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qwen3vl_bridge_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("qwen3vl_bridge_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)


class DaemonSnapshot:
    """Prometheus families built from one `metrics` reply of the daemon."""

    def __init__(self, snapshot: dict):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot
        for name, key, doc, label in (("requests", "requests", "Requests received", "op"),
                                      ("errors", "errors", "Error replies", "code"),
                                      ("inputs", "inputs", "Inputs of successful requests", "op"),
                                      ("tokens", "tokens", "Tokens processed", "op")):
            family = CounterMetricFamily(f"qwen3vl_daemon_{name}", doc, labels=[label])
            for value, count in sorted(s.get(key, {}).items()):
                family.add_metric([value], count)
            yield family
        for name, key in (("queue_depth", "queue_depth"), ("queued_tokens", "queued_tokens")):
            yield GaugeMetricFamily(f"qwen3vl_daemon_{name}", f"Daemon {name.replace('_', ' ')}", value=s.get(key, 0))
        for name in ("forward_s", "queue_wait_s"):
            yield CounterMetricFamily(f"qwen3vl_daemon_{name[:-2]}_seconds", f"Daemon {name[:-2]} time",
                                      value=s.get(name, 0.0))
        latency = HistogramMetricFamily("qwen3vl_daemon_request_seconds", "Daemon request latency", labels=["op"])
        for op, hist in sorted(s.get("latency_s", {}).items()):
            latency.add_metric([op], _buckets(hist), hist["sum"])
        yield latency
        batch = s.get("batch_size")
        if batch:
            family = HistogramMetricFamily("qwen3vl_daemon_batch_size", "Inputs per forward pass")
            family.add_metric([], _buckets(batch), batch["sum"])
            yield family


def _buckets(hist: dict) -> list[tuple[str, float]]:
    bounds = [str(float(b)) for b in hist["buckets"]] + ["+Inf"]
    return list(zip(bounds, hist["counts"]))


# -- the app ---------------------------------------------------------------------------------------
class Measure:
    """ASGI middleware: count requests by route and status, and time them (a plain ASGI wrapper:
    Starlette's BaseHTTPMiddleware costs far more per request)."""

    def __init__(self, app, metrics: BridgeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            path = route.path if route is not None else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def create_app(config: BridgeConfig) -> FastAPI:
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
            raise _Unauthorized

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_request: Request, _exc: _Unauthorized):
        return error_response(401, "unauthorized", "missing or wrong bearer token")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        # For a union (a string or an input object), the deepest error names the field that is wrong.
        errors = exc.errors() or [{"loc": (), "msg": "invalid body"}]
        worst = max(errors, key=lambda e: len(e.get("loc", ())))
        where = ".".join(str(p) for p in worst.get("loc", ()) if p != "body" and not _union_tag(p))
        return error_response(422, "invalid_request", f"{where or 'body'}: {worst.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        # FastAPI's own refusals (a body it cannot parse, an unknown route) in the bridge's error shape.
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(BadInput)
    async def _bad_input(_request: Request, exc: BadInput):
        return error_response(400, "invalid_request", exc.message)


    async def ask(payload: dict, fields: dict[str, str] | None = None) -> dict | JSONResponse:
        """One daemon request; a JSONResponse with the right status when it fails. `fields` renames
        the daemon's field names in error messages to the route's own (OpenAI's `dimensions`)."""
        try:
            reply = await client.request(payload)
        except (ValueError, OverflowError, TypeError) as exc:
            # JSON can carry what msgpack cannot: lone surrogates, integers beyond 64 bits.
            return error_response(400, "invalid_request", f"the request cannot be encoded: {str(exc)[:120]}")
        except DaemonUnavailable as exc:
            return error_response(503, "unavailable", str(exc))
        except DaemonTimeout as exc:
            return error_response(504, "timeout", str(exc))
        if not reply.get("ok"):
            error = reply.get("error") or {}
            code, message = str(error.get("code", "internal")), str(error.get("message", ""))
            for daemon_name, route_name in (fields or {}).items():
                message = re.sub(rf"^{daemon_name}(?=[:\[.])", route_name, message)
            return error_response(STATUS_BY_CODE.get(code, 500), code, message)
        return reply

    @app.post("/embed", response_model=EmbedResponse, responses=ERRORS, dependencies=[Depends(authorized)])
    async def embed(body: EmbedBody):
        """Embed texts (`texts`, the sidecar contract) or multimodal `inputs`."""
        if (body.texts is None) == (body.inputs is None):
            return error_response(422, "invalid_request", "body: give exactly one of texts and inputs")
        inputs = list(body.texts) if body.texts is not None else [
            to_protocol_input(item, f"inputs[{i}]") for i, item in enumerate(body.inputs)]
        reply = await ask({"op": "embed", "inputs": inputs, "instruction": body.instruction,
                           "dimension": body.dimension, "normalize": body.normalize})
        if isinstance(reply, JSONResponse):
            return reply
        result = embed_result(reply)
        # A plain JSONResponse skips re-validating the floats against the response model (measured
        # as milliseconds per request); the model still documents the shape.
        return JSONResponse({"embeddings": result.embeddings.tolist(), "dimension": result.dimension,
                             "model": result.model})

    @app.post("/rerank", response_model=RerankResponse, responses=ERRORS, dependencies=[Depends(authorized)])
    async def rerank(body: RerankBody):
        """Score documents against a query; scores come back in document order."""
        reply = await ask({"op": "rerank", "query": to_protocol_input(body.query, "query"),
                           "documents": [to_protocol_input(d, f"documents[{i}]") for i, d in enumerate(body.documents)],
                           "instruction": body.instruction})
        if isinstance(reply, JSONResponse):
            return reply
        result = rerank_result(reply)
        return JSONResponse({"scores": result.scores, "model": result.model})

    @app.api_route("/health", methods=["GET", "HEAD"], response_model=HealthResponse,
                   responses={503: {"model": HealthResponse}})
    async def health():
        """200 while the daemon is ready; 503 while it loads, drains, or cannot be reached."""
        try:
            reply = await client.request({"op": "health"}, timeout=min(5.0, config.timeout_s))
        except (DaemonUnavailable, DaemonTimeout):
            return JSONResponse(HealthResponse(status="unavailable").model_dump(), status_code=503)
        emb, rr = reply.get("embedding") or {}, reply.get("reranker") or {}
        body = HealthResponse(
            status="ok" if reply.get("status") == "ready" else str(reply.get("status")),
            embedding_model=emb.get("name"), reranker_model=rr.get("name"),
            embedding_loaded=bool(emb.get("loaded")), reranker_loaded=bool(rr.get("loaded")),
            device=reply.get("device"), embedding_dim=emb.get("dimension"),
        ).model_dump()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingsResponse, responses=ERRORS,
              dependencies=[Depends(authorized)])
    async def openai_embeddings(body: OpenAIEmbeddingsBody):
        """OpenAI-compatible embeddings (text input). `model` is informational: the daemon's model answers."""
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            return error_response(422, "invalid_request", "input: must not be empty")
        reply = await ask({"op": "embed", "inputs": texts, "dimension": body.dimensions},
                          fields={"dimension": "dimensions", "inputs": "input"})
        if isinstance(reply, JSONResponse):
            return reply
        result = embed_result(reply)
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode()
                               if body.encoding_format == "base64" else row.tolist())}
                for i, row in enumerate(result.embeddings)]
        return JSONResponse({"object": "list", "data": data, "model": result.model,
                             "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}})

    @app.get("/metrics", response_class=Response, dependencies=[Depends(authorized)])
    async def prometheus():
        """Prometheus text format: the bridge's own metrics and the daemon's counters."""
        text = generate_latest(metrics.registry)
        reply = await ask({"op": "metrics"})
        if not isinstance(reply, JSONResponse):
            registry = CollectorRegistry()
            registry.register(DaemonSnapshot(reply))
            text += generate_latest(registry)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.on_event("shutdown")
    async def _close():
        await client.close()

    app.state.config = config
    app.state.metrics = metrics
    measured = Measure(app, metrics)
    return BodyGuard(measured, config.max_body_bytes or None, config.body_timeout_s)


class _Unauthorized(Exception):
    pass


def read_token(token_file: str | None, env_token: str | None) -> str | None:
    """The bearer token: the file's content, else $QWEN3VL_BRIDGE_TOKEN, else none. An empty or blank
    one is refused: it would silently turn authentication off."""
    if token_file:
        token = Path(token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"the token file {token_file} is empty or blank: write a token into it "
                             "(e.g. `openssl rand -hex 32`), or drop --token-file")
        return token
    if env_token:
        if not env_token.strip():
            raise ValueError("QWEN3VL_BRIDGE_TOKEN is blank: set a token, or unset it")
        return env_token.strip()
    return None


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, allow_no_token: bool) -> None:
    """A bridge reachable from other hosts must ask for a token, unless the operator says otherwise."""
    if token is None and not is_loopback_host(host) and not allow_no_token:
        raise ValueError(f"--host {host} is reachable from other hosts and no token is set: give --token-file "
                         "(or QWEN3VL_BRIDGE_TOKEN), or pass --allow-no-token to serve it unauthenticated")


@click.command()
@click.option("--endpoint", envvar="QWEN3VL_ENDPOINT", default=client_endpoint,
              help="The daemon's endpoint; several, comma-separated, spread the requests and fail over.")
@click.option("--curve-server-key", envvar="QWEN3VL_CURVE_SERVER_KEY", default=None,
              type=click.Path(exists=True, dir_okay=False), help="The daemon's public key file (CURVE).")
@click.option("--curve-client-key", envvar="QWEN3VL_CURVE_CLIENT_KEY", default=None,
              type=click.Path(exists=True, dir_okay=False), help="The bridge's secret key file (CURVE).")
@click.option("--host", envvar="QWEN3VL_BRIDGE_HOST", default="127.0.0.1", show_default=True)
@click.option("--port", envvar=["PORT", "QWEN3VL_BRIDGE_PORT"], type=int, default=8421, show_default=True)
@click.option("--token-file", envvar="QWEN3VL_BRIDGE_TOKEN_FILE", type=click.Path(exists=True, dir_okay=False),
              default=None, help="File holding the bearer token clients must send (none: no token).")
@click.option("--max-body-bytes", envvar="QWEN3VL_BRIDGE_MAX_BODY_BYTES", type=int, default=64 * 1024 * 1024,
              show_default=True)
@click.option("--timeout", envvar="QWEN3VL_BRIDGE_TIMEOUT", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the daemon before answering 504.")
@click.option("--body-timeout", envvar="QWEN3VL_BRIDGE_BODY_TIMEOUT", type=click.FloatRange(min=0.1), default=60.0,
              show_default=True, help="Seconds for a request body to arrive, else 408.")
@click.option("--header-timeout", envvar="QWEN3VL_BRIDGE_HEADER_TIMEOUT", type=click.FloatRange(min=0.1),
              default=10.0, show_default=True, help="Seconds for a request's headers to arrive, else the "
              "connection is closed.")
@click.option("--limit-concurrency", envvar="QWEN3VL_BRIDGE_LIMIT_CONCURRENCY", type=click.IntRange(min=1),
              default=1024, show_default=True, help="Open connections beyond which requests get 503 at once.")
@click.option("--allow-no-token", envvar="QWEN3VL_BRIDGE_ALLOW_NO_TOKEN", is_flag=True, default=False,
              help="Serve a non-loopback --host without a bearer token (refused otherwise).")
@click.option("--log-level", envvar="QWEN3VL_LOG_LEVEL", default="info", show_default=True,
              help="debug, info, warning or error.")
def main(endpoint, curve_server_key, curve_client_key, host, port, token_file, max_body_bytes, timeout, body_timeout,
         header_timeout, limit_concurrency, allow_no_token, log_level) -> None:
    """Serve the HTTP bridge in front of a running qwen3vl daemon."""
    import uvicorn

    try:
        token = read_token(token_file, os.environ.get("QWEN3VL_BRIDGE_TOKEN"))
        check_exposure(host, token, allow_no_token)
    except ValueError as exc:
        click.echo(f"qwen3vl-bridge: {exc}", err=True)
        sys.exit(1)
    curve = CurveKeys.from_files(curve_server_key, curve_client_key) if curve_server_key else None
    config = BridgeConfig(endpoint=endpoint, host=host, port=port, token=token, max_body_bytes=max_body_bytes,
                          timeout_s=timeout, body_timeout_s=body_timeout, header_timeout_s=header_timeout,
                          limit_concurrency=limit_concurrency, curve=curve)
    if token is None and not is_loopback_host(host):
        logging.getLogger("qwen3vl.bridge").warning("serving %s WITHOUT authentication (--allow-no-token)", host)
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level.lower(),
                http=header_timeout_protocol(config.header_timeout_s), limit_concurrency=config.limit_concurrency)


for _param in main.params:  # `--help` names each option's environment variable
    if isinstance(_param, click.Option) and _param.envvar:
        _param.show_envvar = True


if __name__ == "__main__":
    main()
