"""The bridge's HTTP bodies (pydantic: they are also its OpenAPI document), and their conversion
into the daemon's wire inputs."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from .errors import BridgeError, invalid_request

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
    # Strict, as the socket is: no true for 1, 2.0 for 2, or "2" for 2 (an int is a float, as in msgpack).
    fps: StrictFloat | None = Field(None, ge=0.01, le=60)  # the daemon's range
    max_frames: StrictInt | None = Field(None, ge=2, le=768)


FINGERPRINT_FIELD = Field(None, min_length=1, max_length=128,
                          description="Refuse (409 model_mismatch) unless the daemon serves the model of this "
                                      "fingerprint (the X-Model-Fingerprint header of earlier replies)")


Priority = Literal["interactive", "batch"]
PRIORITY_FIELD = Field(None, description="interactive (the default: someone waits) or batch (bulk work that yields "
                                         "to interactive requests); overrides the X-Priority header")


class EmbedBody(BaseModel):
    texts: list[str] | None = Field(None, description="Texts to embed (the sidecar contract)")
    inputs: list[Union[str, InputObject]] | None = Field(None, description="Multimodal inputs instead of texts")
    instruction: str | None = None
    dimension: StrictInt | None = Field(None, ge=1)
    normalize: StrictBool | None = Field(True, description="null means true, as on the socket")
    expect_fingerprint: str | None = FINGERPRINT_FIELD
    priority: Priority | None = PRIORITY_FIELD


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int
    model: str


class RerankBody(BaseModel):
    query: Union[str, InputObject]
    documents: list[Union[str, InputObject]]
    instruction: str | None = None
    expect_fingerprint: str | None = FINGERPRINT_FIELD
    priority: Priority | None = PRIORITY_FIELD


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
    # Additions (the sidecar's fields above are unchanged): how each model holds its weights
    # (bfloat16, float32, int8, nf4, fp8, w8a8), their bytes on the device, and their fingerprints.
    embedding_weights: str | None = None
    reranker_weights: str | None = None
    embedding_memory_bytes: int | None = None
    reranker_memory_bytes: int | None = None
    embedding_fingerprint: str | None = None
    reranker_fingerprint: str | None = None


EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]


# Token ids in `input` are another tokenizer's (LangChain's OpenAIEmbeddings sends tiktoken's by
# default): embedding them as Qwen's would be silently wrong, so they are refused, naming the fix.
TOKEN_IDS_REFUSED = ("token ids are not accepted: they would be another tokenizer's (tiktoken's), not this "
                     "model's; send the texts themselves. LangChain: OpenAIEmbeddings(..., "
                     "check_embedding_ctx_length=False); LlamaIndex: OpenAILikeEmbedding or "
                     "OpenAIEmbedding(model_name=...)")


class OpenAIEmbeddingsBody(BaseModel):
    input: str | list[str]
    instruction: str | None = Field(None, description="Extension: the task instruction (as /embed's); unset: the "
                                                      "daemon's default")
    model: str | None = Field(None, description="The daemon's embedding model of this name (or configured path or "
                                                "hub id, or fingerprint); unset: its default; one it does not serve "
                                                "is refused with 404 model_not_found")
    dimensions: StrictInt | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    embedding_type: EmbeddingType = Field(
        "float", description="Extension (Cohere's names): int8/uint8 per component, binary/ubinary the packed "
                             "sign bits (dimensions/8 bytes). With encoding_format float: a list of integers; "
                             "base64: the raw bytes")
    expect_fingerprint: str | None = FINGERPRINT_FIELD
    priority: Priority | None = PRIORITY_FIELD

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(_token_ids(v) for v in value[:8]) or _token_ids(value):
            raise ValueError(TOKEN_IDS_REFUSED)
        return value


def _token_ids(value: Any) -> bool:
    """An int, or a non-empty list of ints (what OpenAI's API takes as pre-tokenized input)."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class CohereRerankBody(BaseModel):
    """Cohere's and Jina's rerank body: `POST /v1/rerank`."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="The daemon's reranker of this name (or configured path or hub id, "
                                                "or fingerprint); unset: its default; one it does not serve is "
                                                "refused with 404 model_not_found")
    query: Union[str, InputObject]
    documents: list[Union[str, InputObject]] = Field(description="Texts, {\"text\"} or multimodal input objects")
    top_n: StrictInt | None = Field(None, ge=1, description="Return the best top_n results (default: all)")
    return_documents: StrictBool = False
    instruction: str | None = None
    expect_fingerprint: str | None = FINGERPRINT_FIELD
    priority: Priority | None = PRIORITY_FIELD
    # Any value of these is refused by name (400 unsupported), whatever its type.
    rank_fields: Any = Field(None, description="Not supported: give documents as text or input objects")
    max_chunks_per_doc: Any = Field(None, description="Not supported: long documents are truncated")


class CohereRerankResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereRerankResult] = Field(description="By descending relevance_score, ties by index")
    model: str
    meta: dict[str, Any] | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 409, 413, 422, 429, 500, 503, 504)}


# -- conversions to the daemon's inputs ------------------------------------------------------------
def _bad_input(message: str) -> BridgeError:
    return invalid_request(message)


def _decode_b64(value: str, where: str) -> bytes:
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_input(f"{where}: not a data URL or base64 string") from None


def _media(value: MediaRef, where: str) -> Any:
    if isinstance(value, str):
        return _decode_b64(value, where)
    if len(value) == 1 and next(iter(value)) in ("path", "url"):
        return dict(value)
    raise _bad_input(f"{where}: expected a data URL, base64, {{\"path\"}} or {{\"url\"}}")


def _video(value: dict[str, Any], where: str) -> Any:
    """One video in the protocol's list-of-videos form: a frame list, or a file map."""
    if set(value) == {"frames"} and isinstance(value["frames"], list) and value["frames"]:
        return [_media(f, f"{where}.frames[{i}]") for i, f in enumerate(value["frames"])]
    if set(value) == {"data"} and isinstance(value["data"], str):
        return {"data": _decode_b64(value["data"], f"{where}.data")}
    if len(value) == 1 and next(iter(value)) in ("path", "url") and isinstance(next(iter(value.values())), str):
        return dict(value)
    raise _bad_input(f"{where}: expected {{\"frames\": [...]}}, {{\"data\": ...}}, {{\"path\"}} or {{\"url\"}}")


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
