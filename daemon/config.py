"""Every setting of the daemon, in typed dataclasses. The per-request limits, the priorities and the
default socket location are the wire's, so they live in the client package, which this imports."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qwen3vl_client.endpoints import default_endpoint, systemd_directory
from qwen3vl_client.limits import Limits

DEFAULT_EMBEDDING_MODEL = "Qwen/Qwen3-VL-Embedding-2B"
DEFAULT_RERANKER_MODEL = "Qwen/Qwen3-VL-Reranker-2B"
EMBEDDING_MAX_LENGTH, RERANKER_MAX_LENGTH = 8192, 10240  # the official defaults, in tokens


def default_fingerprint_cache(env: dict[str, str] | None = None) -> Path:
    """`fingerprints.json` under systemd's $CACHE_DIRECTORY, else $XDG_CACHE_HOME or ~/.cache/qwen3vl-daemon."""
    env = os.environ if env is None else env
    base = systemd_directory(env, "CACHE_DIRECTORY")
    if base:
        return Path(base) / "fingerprints.json"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3vl-daemon" / "fingerprints.json"


def show_envvars(command) -> None:
    """Make a click command's `--help` name each option's environment variable."""
    for param in command.params:
        if getattr(param, "envvar", None):
            param.show_envvar = True


def default_model_name(source: str) -> str:
    """A model's name unless the operator gives one: the last part of its directory or hub id."""
    return Path(source.rstrip("/")).name or source


LOAD_MODES = ("at-start", "on-demand")


def is_disabled(name: str | None) -> bool:
    return name is None or name.strip().lower() in ("", "none", "off", "disabled")


@dataclass(frozen=True)
class ModelSettings:
    """How to load one model. `name` is a Hugging Face id or a local directory."""

    name: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | bfloat16 | float32 | float16
    attn_implementation: str = "sdpa"
    max_length: int = EMBEDDING_MAX_LENGTH
    local_files_only: bool = False
    quantize: str = "none"  # none | int8 | nf4 | fp8 | w8a8: the language model's linear layers (weights.py)
    alias: str | None = None  # the name requests use (`model`); None: the directory's or hub id's last part
    keep_alive_s: float | None = None  # idle this long, the model is unloaded; None: kept loaded forever

    @property
    def served_name(self) -> str:
        return self.alias or default_model_name(self.name)


@dataclass(frozen=True)
class MediaPolicy:
    """What a client may make the daemon read, and how much. Paths and URLs are refused unless the
    operator allows them; every size is checked before the media is decoded."""

    allowed_roots: tuple[Path, ...] = ()
    allow_urls: bool = False
    allow_private_urls: bool = False  # loopback, link-local and private targets
    url_timeout_s: float = 30.0  # one download, from connecting to its last byte
    max_image_bytes: int = 64 * 1024 * 1024  # an image file read by path or downloaded
    max_video_bytes: int = 512 * 1024 * 1024  # a video file read by path or downloaded
    max_image_pixels: int = 64 * 1024 * 1024  # an image's or a video frame's size, read from its header
    max_video_frames: int = 1024  # frames a client may send as a frame list
    max_video_seconds: float = 3600.0  # a video file's duration, read from its header
    # A video's sampled frames once decoded (frames x width x height, from headers): 64 frames of 1080p
    # fit; a few bytes of PNG per frame declaring 8000x8000 pixels do not.
    max_video_pixels: int = 160_000_000


@dataclass(frozen=True)
class Batching:
    """Dynamic batching, preprocessing and backpressure (see README, "Tuning the batching")."""

    max_batch_size: int = 32  # inputs per forward pass
    max_batch_tokens: int | None = None  # padded tokens per forward (size x longest); None: by device
    max_wait_ms: float = 0.5  # longest a ready input waits for others still being preprocessed
    # The least share of the model thread's time that waiting batch-priority work gets while
    # interactive work keeps coming (batching.py's rule); interactive work otherwise goes first.
    batch_share: float = 0.1
    preempt: bool = True  # interactive work runs between two decoder layers of a batch-priority forward
    # Preprocessing threads: half the CPUs (at most 4), leaving the rest to a CPU forward's own threads.
    prep_workers: int = field(default_factory=lambda: max(1, min(4, (os.cpu_count() or 2) // 2)))
    max_queued_inputs: int = 8192  # inputs and documents accepted, not yet answered; beyond: overloaded
    max_queued_tokens: int = 4_000_000  # their estimated tokens (an upper bound); beyond: overloaded
    cache_bytes: int = 0  # embedding cache size; 0 disables it
    # Images' prepared pixels by content (the same image in many rerank documents or requests): the
    # decoded, resized uint8 frames; 0 disables it.
    image_cache_bytes: int = 128 * 1024 * 1024


@dataclass(frozen=True)
class DaemonConfig:
    endpoint: str = field(default_factory=default_endpoint)
    # The default model of each kind (what a request without `model` gets), and the others served
    # beside it, by name (`--embedding-model` / `--reranker-model` given several times).
    embedding: ModelSettings | None = ModelSettings(DEFAULT_EMBEDDING_MODEL, max_length=EMBEDDING_MAX_LENGTH)
    reranker: ModelSettings | None = ModelSettings(DEFAULT_RERANKER_MODEL, max_length=RERANKER_MAX_LENGTH)
    more_embedding: tuple[ModelSettings, ...] = ()
    more_reranker: tuple[ModelSettings, ...] = ()
    load: str = "at-start"  # at-start: READY once the default models are loaded; on-demand: once the socket is up
    embedding_dim: int | None = None  # default output dimension; None means the model's full size
    media: MediaPolicy = MediaPolicy()
    limits: Limits = Limits()
    batching: Batching = Batching()
    socket_mode: int = 0o600  # 0660 shares the socket with the daemon's group
    warmup: bool = True
    drain_timeout_s: float = 30.0  # after SIGTERM, longest wait for accepted requests
    # CURVE for tcp:// endpoints: the server's secret key file and a directory of authorized client
    # public keys (both as `qwen3vl-daemon keygen` writes them).
    curve_secret_key: Path | None = None
    curve_authorized_keys: Path | None = None
    # Where model files' digests are kept between starts (fingerprint.py); None: hash every start.
    fingerprint_cache: Path | None = field(default_factory=default_fingerprint_cache)
    # Quantized models kept as converted in `weights/` beside the fingerprint cache (weights_cache.py),
    # so a restart or a reload skips the conversion; off, or without a fingerprint cache: convert each load.
    weights_cache: bool = True
    int8_calibration: Path | None = None  # per-dimension int8/uint8 ranges (`calibrate`); None: the fixed scale
    # Before loading, the models' memory estimated from their files (fit.py) is compared with what the
    # device has free and with this budget (bytes, None: no budget of its own); over either, the start stops.
    memory_budget: int | None = None
    fit_check: bool = True
    # HOST:PORT of the daemon's own Prometheus /metrics (prometheus.py); None: no HTTP at all.
    metrics_address: str | None = None

    def weights_cache_directory(self) -> Path | None:
        if not self.weights_cache or self.fingerprint_cache is None:
            return None
        return self.fingerprint_cache.parent / "weights"

    def models(self) -> list[tuple[str, ModelSettings, bool]]:
        """Every configured model as (kind, settings, whether it is its kind's default), defaults first."""
        found = []
        for kind, default, more in (("embedding", self.embedding, self.more_embedding),
                                    ("reranker", self.reranker, self.more_reranker)):
            if default is not None:
                found += [(kind, default, True), *((kind, s, False) for s in more)]
        return found
