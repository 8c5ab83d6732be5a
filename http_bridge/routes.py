"""The bridge's routes: each is one request to the daemon, through `DaemonGateway`."""

from __future__ import annotations

import base64
import re

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from daemon.client import AsyncClient, DaemonTimeout, DaemonUnavailable
from daemon.protocol import (EmbedReply, ErrorCode, HealthReply, MetricsReply, RerankReply, embed_request,
                             health_request, metrics_request, rerank_request)

from .errors import BridgeError
from .metrics import BridgeMetrics, exposition
from .schemas import (ERRORS, EmbedBody, EmbedResponse, HealthResponse, OpenAIEmbeddingsBody,
                      OpenAIEmbeddingsResponse, RerankBody, RerankResponse, to_protocol_input)


class DaemonGateway:
    """One daemon request per call; every failure becomes a BridgeError with the right status."""

    def __init__(self, client: AsyncClient):
        self.client = client

    async def call(self, payload: dict, timeout: float | None = None, fields: dict[str, str] | None = None) -> dict:
        """The daemon's successful reply. `fields` renames the daemon's field names in error messages
        to the route's own (OpenAI's `dimensions`)."""
        try:
            reply = await self.client.request(payload, timeout)
        except (ValueError, OverflowError, TypeError) as exc:
            # JSON can carry what msgpack cannot: lone surrogates, integers beyond 64 bits.
            raise BridgeError(400, "invalid_request", f"the request cannot be encoded: {str(exc)[:120]}") from None
        except DaemonUnavailable as exc:
            raise BridgeError(503, "unavailable", str(exc)) from None
        except DaemonTimeout as exc:
            raise BridgeError(504, "timeout", str(exc)) from None
        if not reply.get("ok"):
            error = reply.get("error") or {}
            code, message = str(error.get("code", ErrorCode.INTERNAL.value)), str(error.get("message", ""))
            for daemon_name, route_name in (fields or {}).items():
                message = re.sub(rf"^{daemon_name}(?=[:\[.])", route_name, message)
            raise BridgeError.from_daemon(code, message)
        return reply


def build_router(gateway: DaemonGateway, metrics: BridgeMetrics, authorized, health_timeout_s: float) -> APIRouter:
    router = APIRouter()
    guarded = [Depends(authorized)]

    @router.post("/embed", response_model=EmbedResponse, responses=ERRORS, dependencies=guarded)
    async def embed(body: EmbedBody):
        """Embed texts (`texts`, the sidecar contract) or multimodal `inputs`."""
        if (body.texts is None) == (body.inputs is None):
            raise BridgeError(422, "invalid_request", "body: give exactly one of texts and inputs")
        inputs = list(body.texts) if body.texts is not None else [
            to_protocol_input(item, f"inputs[{i}]") for i, item in enumerate(body.inputs)]
        result = EmbedReply.from_wire(await gateway.call(embed_request(inputs, body.instruction, body.dimension,
                                                                       body.normalize)))
        # A plain JSONResponse skips re-validating the floats against the response model (measured
        # as milliseconds per request); the model still documents the shape.
        return JSONResponse({"embeddings": result.embeddings.tolist(), "dimension": result.dimension,
                             "model": result.model})

    @router.post("/rerank", response_model=RerankResponse, responses=ERRORS, dependencies=guarded)
    async def rerank(body: RerankBody):
        """Score documents against a query; scores come back in document order."""
        documents = [to_protocol_input(d, f"documents[{i}]") for i, d in enumerate(body.documents)]
        payload = rerank_request(to_protocol_input(body.query, "query"), documents, body.instruction)
        result = RerankReply.from_wire(await gateway.call(payload))
        return JSONResponse({"scores": result.scores, "model": result.model})

    @router.api_route("/health", methods=["GET", "HEAD"], response_model=HealthResponse,
                      responses={503: {"model": HealthResponse}})
    async def health():
        """200 while the daemon is ready; 503 while it loads, drains, or cannot be reached."""
        try:
            reply = HealthReply.from_wire(await gateway.call(health_request(), timeout=health_timeout_s))
        except BridgeError as exc:
            if exc.code not in ("unavailable", "timeout"):
                raise
            return JSONResponse(HealthResponse(status="unavailable").model_dump(), status_code=503)
        body = HealthResponse(
            status="ok" if reply.status == "ready" else reply.status,
            embedding_model=reply.embedding.name, reranker_model=reply.reranker.name,
            embedding_loaded=reply.embedding.loaded, reranker_loaded=reply.reranker.loaded,
            device=reply.device, embedding_dim=reply.embedding.dimension,
        ).model_dump()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @router.post("/v1/embeddings", response_model=OpenAIEmbeddingsResponse, responses=ERRORS, dependencies=guarded)
    async def openai_embeddings(body: OpenAIEmbeddingsBody):
        """OpenAI-compatible embeddings (text input). `model` is informational: the daemon's model answers."""
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise BridgeError(422, "invalid_request", "input: must not be empty")
        reply = await gateway.call(embed_request(texts, dimension=body.dimensions),
                                   fields={"dimension": "dimensions", "inputs": "input"})
        result = EmbedReply.from_wire(reply)
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode()
                               if body.encoding_format == "base64" else row.tolist())}
                for i, row in enumerate(result.embeddings)]
        return JSONResponse({"object": "list", "data": data, "model": result.model,
                             "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}})

    @router.get("/metrics", response_class=Response, dependencies=guarded)
    async def prometheus():
        """Prometheus text format: the bridge's own metrics and the daemon's counters."""
        try:
            snapshot = MetricsReply.from_wire(await gateway.call(metrics_request()))
        except BridgeError:  # the daemon is away: the bridge's own metrics still answer
            snapshot = None
        return Response(exposition(metrics, snapshot), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router
