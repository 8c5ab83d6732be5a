"""The bridge's routes: each is one request to the daemon, through `DaemonGateway`."""

from __future__ import annotations

import base64
import re
import uuid

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse, Response

from qwen3vl_client.client import AsyncClient, DaemonTimeout, DaemonUnavailable
from qwen3vl_client.protocol import (PRIORITIES, EmbedReply, ErrorCode, HealthReply, MetricsReply, RerankReply,
                                     as_lists, embed_request, encode_rows, health_request, metrics_request,
                                     rerank_request)

from .errors import MODEL_NOT_FOUND, UNSUPPORTED_STATUS, BridgeError, invalid_request
from .metrics import BridgeMetrics, exposition
from .schemas import (ERRORS, CohereRerankBody, CohereRerankResponse, EmbedBody, EmbedResponse, HealthResponse,
                      InputObject, OpenAIEmbeddingsBody, OpenAIEmbeddingsResponse, RerankBody, RerankResponse,
                      to_protocol_input)

FINGERPRINT_HEADER = "X-Model-Fingerprint"
PRIORITY_HEADER = "X-Priority"  # interactive | batch, for callers that cannot add a body field (SDKs)
# The daemon's field names in error messages, as /v1/embeddings calls them.
OPENAI_FIELDS = {"dimension": "dimensions", "inputs": "input", "encoding": "embedding_type"}


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
            raise invalid_request(f"the request cannot be encoded: {str(exc)[:120]}") from None
        except DaemonUnavailable as exc:
            raise BridgeError(503, "unavailable", str(exc)) from None
        except DaemonTimeout as exc:
            raise BridgeError(504, "timeout", str(exc)) from None
        if not reply.get("ok"):
            error = reply.get("error") or {}
            code, message = str(error.get("code", ErrorCode.INTERNAL.value)), str(error.get("message", ""))
            for daemon_name, route_name in (fields or {}).items():
                message = re.sub(rf"^{daemon_name}(?=[:\[.])", route_name, message)
            details = {k: v for k, v in error.items() if k not in ("code", "message")}
            raise BridgeError.from_daemon(code, message, details)
        return reply


def answer(body: dict, fingerprint: str | None) -> JSONResponse:
    """A route's JSON, naming the model that made it in the X-Model-Fingerprint header. A plain
    JSONResponse skips re-validating floats against the response model (milliseconds per request);
    the model still documents the shape."""
    return JSONResponse(body, headers={FINGERPRINT_HEADER: fingerprint} if fingerprint else None)


def embedding_json(row: list, encoding: str, encoding_format: str):
    """One row as OpenAI writes it: numbers (floats, or the compact type's integers), or base64 of
    its bytes as the wire has them (little-endian float32, or the compact bytes as they are)."""
    if encoding_format == "base64":
        return base64.b64encode(encode_rows([row], encoding)).decode()
    return row


FINGERPRINT = re.compile(r"[0-9a-f]{20}")  # as health reports it (fingerprint.py: FINGERPRINT_HEX)


def route(requested: str | None, expect_fingerprint: str | None) -> dict:
    """The daemon fields a route's `model` becomes: a fingerprint picks the served model of that
    fingerprint (expect_fingerprint); anything else is a model's name (or its configured path or hub
    id), which the daemon refuses with unknown_model (404 model_not_found here) when it serves none."""
    if requested is None:
        return {"expect_fingerprint": expect_fingerprint}
    if FINGERPRINT.fullmatch(requested) and expect_fingerprint in (None, requested):
        return {"expect_fingerprint": requested}
    return {"model": requested, "expect_fingerprint": expect_fingerprint}


async def call_for_model(gateway: DaemonGateway, payload: dict, requested: str | None, **kw) -> dict:
    """The daemon's reply to a request whose `model` the route was given: a fingerprint no served
    model has is, to an SDK, a model that is not found (404), as a name would be."""
    try:
        return await gateway.call(payload, **kw)
    except BridgeError as exc:
        if exc.code == ErrorCode.MODEL_MISMATCH.value and requested is not None and "model" not in payload:
            raise BridgeError(404, MODEL_NOT_FOUND, f"model: {exc.message}", exc.details) from None
        raise


def priority(field: str | None, headers: list[str] | None) -> str | None:
    """A request's priority: its body's `priority`, else the X-Priority header, else none (the
    daemon's default, interactive). The header is checked even when the body wins: a value that
    names no priority (any case and spacing is taken), or two headers that disagree, are refused."""
    values = {value.strip().lower() for value in headers or ()}
    wrong = sorted(values - set(PRIORITIES))
    if wrong:
        raise invalid_request(f"{PRIORITY_HEADER} header: expected {' or '.join(PRIORITIES)}, not {wrong[0][:40]!r}")
    if len(values) > 1:
        raise invalid_request(f"{PRIORITY_HEADER} header: given more than once with different values")
    return field if field is not None else next(iter(values), None)


PRIORITY_HEADER_PARAM = Header(None, alias=PRIORITY_HEADER, description="interactive or batch (the body's "
                                                                         "`priority` wins)")


def document_json(document: str | InputObject) -> dict:
    return {"text": document} if isinstance(document, str) else document.model_dump(exclude_none=True)


def build_router(gateway: DaemonGateway, metrics: BridgeMetrics, authorized, health_timeout_s: float) -> APIRouter:
    router = APIRouter()
    guarded = [Depends(authorized)]

    @router.post("/embed", response_model=EmbedResponse, responses=ERRORS, dependencies=guarded)
    async def embed(body: EmbedBody, x_priority: list[str] | None = PRIORITY_HEADER_PARAM):
        """Embed texts (`texts`, the sidecar contract) or multimodal `inputs`."""
        if (body.texts is None) == (body.inputs is None):
            raise invalid_request("body: give exactly one of texts and inputs")
        inputs = list(body.texts) if body.texts is not None else [
            to_protocol_input(item, f"inputs[{i}]") for i, item in enumerate(body.inputs)]
        payload = embed_request(inputs, body.instruction, body.dimension, body.normalize,
                                expect_fingerprint=body.expect_fingerprint, priority=priority(body.priority, x_priority))
        result = EmbedReply.from_wire(await gateway.call(payload))
        return answer({"embeddings": as_lists(result.embeddings), "dimension": result.dimension,
                       "model": result.model}, result.fingerprint)

    @router.post("/rerank", response_model=RerankResponse, responses=ERRORS, dependencies=guarded)
    async def rerank(body: RerankBody, x_priority: list[str] | None = PRIORITY_HEADER_PARAM):
        """Score documents against a query; scores come back in document order."""
        documents = [to_protocol_input(d, f"documents[{i}]") for i, d in enumerate(body.documents)]
        payload = rerank_request(to_protocol_input(body.query, "query"), documents, body.instruction,
                                 expect_fingerprint=body.expect_fingerprint, priority=priority(body.priority, x_priority))
        result = RerankReply.from_wire(await gateway.call(payload))
        return answer({"scores": result.scores, "model": result.model}, result.fingerprint)

    @router.post("/v1/rerank", response_model=CohereRerankResponse, responses=ERRORS, dependencies=guarded)
    async def cohere_rerank(body: CohereRerankBody, x_priority: list[str] | None = PRIORITY_HEADER_PARAM):
        """Cohere- and Jina-compatible reranking: results by descending relevance, at most top_n."""
        for name in ("rank_fields", "max_chunks_per_doc"):
            if getattr(body, name) is not None:
                raise BridgeError(UNSUPPORTED_STATUS, ErrorCode.UNSUPPORTED.value, f"{name}: not supported by this server")
        if not body.documents:
            raise invalid_request("documents: must not be empty")
        documents = [to_protocol_input(d, f"documents[{i}]") for i, d in enumerate(body.documents)]
        payload = rerank_request(to_protocol_input(body.query, "query"), documents, body.instruction,
                                 top_n=body.top_n or len(documents), priority=priority(body.priority, x_priority),
                                 **route(body.model, body.expect_fingerprint))
        result = RerankReply.from_wire(await call_for_model(gateway, payload, body.model))
        results = [{"index": i, "relevance_score": result.scores[i],
                    **({"document": document_json(body.documents[i])} if body.return_documents else {})}
                   for i in result.top]
        return answer({"id": str(uuid.uuid4()), "results": results, "model": result.model,
                       "meta": {"api_version": {"version": "1"},
                                "tokens": {"input_tokens": result.tokens, "output_tokens": 0}},
                       "usage": {"total_tokens": result.tokens}}, result.fingerprint)

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
            embedding_weights=reply.embedding.weights, reranker_weights=reply.reranker.weights,
            embedding_memory_bytes=reply.embedding.memory_bytes, reranker_memory_bytes=reply.reranker.memory_bytes,
            embedding_fingerprint=reply.embedding.fingerprint, reranker_fingerprint=reply.reranker.fingerprint,
        ).model_dump()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @router.post("/v1/embeddings", response_model=OpenAIEmbeddingsResponse, responses=ERRORS, dependencies=guarded)
    async def openai_embeddings(body: OpenAIEmbeddingsBody, x_priority: list[str] | None = PRIORITY_HEADER_PARAM):
        """OpenAI-compatible embeddings (text input). `model`, when given, picks the daemon's model of
        that name (or path, hub id or fingerprint); one it does not serve is 404 model_not_found.
        The extension field `embedding_type` asks for int8, uint8, binary or ubinary vectors."""
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise invalid_request("input: must not be empty")
        encoding = None if body.embedding_type == "float" else body.embedding_type
        payload = embed_request(texts, body.instruction, dimension=body.dimensions, encoding=encoding,
                                priority=priority(body.priority, x_priority), **route(body.model, body.expect_fingerprint))
        result = EmbedReply.from_wire(await call_for_model(gateway, payload, body.model, fields=OPENAI_FIELDS))
        data = [{"object": "embedding", "index": i, "embedding": embedding_json(row, result.encoding, body.encoding_format)}
                for i, row in enumerate(as_lists(result.embeddings))]
        return answer({"object": "list", "data": data, "model": result.model,
                       "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}, result.fingerprint)

    @router.get("/metrics", response_class=Response, dependencies=guarded)
    async def prometheus():
        """Prometheus text format: the bridge's own metrics and the daemon's counters (of the daemon
        that answered: per-pod figures come from each daemon's own --metrics-address)."""
        metrics.daemons.set(len(gateway.client.daemons()))
        try:
            snapshot = MetricsReply.from_wire(await gateway.call(metrics_request()))
        except BridgeError:  # the daemon is away: the bridge's own metrics still answer
            snapshot = None
        return Response(exposition(metrics, snapshot), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router
