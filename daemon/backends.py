"""What the engine runs: model backends behind one small interface, and the loader of the real ones.

A backend does two things, as text-embeddings-inference's `Backend` and infinity's `encode_pre /
encode_core` split them: `prepare` turns one piece of work into model-ready input on any thread (chat
template, media, tokens), and `forward` runs one batch of prepared inputs on the model thread. The
engine knows nothing else about models, so its tests run with stand-in backends in milliseconds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from .bounded import BoundedCache
from .config import DaemonConfig
from .errors import ModelLoadError
from .fingerprint import DigestCache, Fingerprint, fingerprint_directory, model_directory, weights_fingerprint
from .inputs import InputItem
from .quantize import Calibration

log = logging.getLogger(__name__)

EMBEDDING, RERANKER = "embedding", "reranker"  # backend kinds: the models a daemon holds


@dataclass(frozen=True)
class BackendInfo:
    name: str
    device: str  # cpu, cuda, cuda:1, mps
    dtype: str  # float32, bfloat16, ...
    max_length: int  # tokens per input
    hidden_size: int | None = None  # the embedding's full dimension
    fingerprint: str | None = None  # of the model's files and weight format (fingerprint.py)
    weights: str = "float32"  # the weight format: the dtype (unquantized), int8, nf4 or fp8
    memory_bytes: int = 0  # what the model's parameters and buffers hold on its device
    memory_estimate_bytes: int | None = None  # what fit.py estimated before loading (weights only)


class Prepared(Protocol):
    tokens: int  # sequence length: what batching and padding are measured in


class Backend(Protocol):
    info: BackendInfo

    def prepare(self, work: Any) -> Prepared:
        """Model-ready input for one piece of work; RequestError for a bad input. Any thread."""

    def prepare_many(self, works: list) -> list[Prepared | Exception]:
        """`prepare` of each piece of work, or the exception it raised (one bad input fails only
        itself); work that can be prepared together is (one tokenizer call). Any thread."""

    def forward(self, batch: list[Prepared]) -> Sequence[Any]:
        """One result per prepared input, in order (an array's rows, or a list). The model thread only."""

    def warmup(self) -> None:
        """One short forward, so that the first request does not pay for lazy initialisation."""

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether `exc` from `forward` means the device ran out of memory (then smaller batches may fit)."""

    def free_memory(self) -> None:
        """Release cached device memory after an out-of-memory error."""


@dataclass(frozen=True)
class EmbedWork:
    item: InputItem
    instruction: str | None


@dataclass(frozen=True)
class RerankWork:
    query: InputItem
    document: InputItem
    instruction: str | None


class _TorchBackend:
    """What both model backends share: identity, and torch's out-of-memory handling."""

    def __init__(self, model, hidden_size: int | None = None):
        from .weights import model_bytes, weights_label

        self.model = model
        self.info = BackendInfo(name=model.name, device=str(model.device),
                                dtype=str(model.dtype).replace("torch.", ""), max_length=model.max_length,
                                hidden_size=hidden_size, weights=weights_label(model.weights_format, model.dtype),
                                memory_bytes=model_bytes(model.full_model))

    def warmup(self) -> None:
        self.model.warmup()

    def is_out_of_memory(self, exc: BaseException) -> bool:
        import torch

        return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()

    def free_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class EmbeddingBackend(_TorchBackend):
    def __init__(self, model):
        super().__init__(model, hidden_size=model.hidden_size)

    def prepare(self, work: EmbedWork):
        return self.model.prepare(work.item, work.instruction)

    def prepare_many(self, works: list[EmbedWork]) -> list:
        return self.model.prepare_many([(work.item, work.instruction) for work in works])

    def forward(self, batch: list):
        return self.model.embed(batch).numpy()


class RerankerBackend(_TorchBackend):
    def prepare(self, work: RerankWork):
        return self.model.prepare(work.query, work.document, work.instruction)

    def prepare_many(self, works: list[RerankWork]) -> list:
        return self.model.prepare_many([(work.query, work.document, work.instruction) for work in works])

    def forward(self, batch: list):
        return self.model.score(batch)


def load_model_backends(config: DaemonConfig, backends: dict[str, Backend], step: Callable[..., None],
                        calibration: Calibration | None = None, image_cache: BoundedCache | None = None) -> None:
    """Put the configured models into `backends` as each is fingerprinted and loaded, then warm them
    up. `step(what, stage)` is called before each step, with the stage its time counts in (import,
    weights, fingerprint, warmup); it raises to stop loading between two steps. A model that cannot
    load raises ModelLoadError, and so does an int8 `calibration` made with another embedding model.
    Both models share `image_cache` (images' prepared pixels: their resize is the same)."""
    from .inputs import MediaReader

    step("importing torch and transformers", "import")
    from .models import EmbeddingModel, RerankerModel, import_libraries

    import_libraries()
    media = MediaReader(config.media, image_cache)
    models = [(kind, s) for kind, s in ((EMBEDDING, config.embedding), (RERANKER, config.reranker)) if s is not None]
    step("finding the models' files", "weights")
    directories = {kind: model_directory(s.name, s.local_files_only) for kind, s in models}
    estimates: dict[str, int] = {}
    if not config.fit_check and config.memory_budget is not None:
        log.warning("--memory-budget is not enforced: --no-fit-check skips the check that compares it")
    if config.fit_check:
        step("estimating the models' memory", "weights")
        estimates = _check_fit(config, models, directories)
    builders = {EMBEDDING: lambda files: EmbeddingBackend(EmbeddingModel(config.embedding, media, files)),
                RERANKER: lambda files: RerankerBackend(RerankerModel(config.reranker, media, files))}
    for kind, settings in models:
        before = (lambda files_print, served, s=settings: _check_calibration_print(calibration, s, files_print, served)
                  ) if kind == EMBEDDING else None
        backend = _load_fingerprinted(config, settings, kind, directories[kind], step, builders[kind], before)
        backends[kind] = backend
        backend.info = replace(backend.info, memory_estimate_bytes=estimates.get(kind))
        if kind == EMBEDDING:
            _check_dimension_setting(config, backend.info)
            _check_calibration(calibration, backend.info)
    _tokenizer_threads(backends)
    if config.warmup:
        for kind, backend in backends.items():
            step(f"warming up the {kind} model", "warmup")
            backend.warmup()


def _check_fit(config: DaemonConfig, models: list, directories: dict[str, Path]) -> dict[str, int]:
    """Each model's weights as estimated from its files' headers (fit.py); ModelLoadError, with
    what would fit, when the models and a batch's working memory exceed what the device has free
    or the operator's --memory-budget."""
    import torch

    from .engine import ACCELERATOR_BATCH_TOKENS, CPU_BATCH_TOKENS
    from .fit import Plan, check_fit, checkpoint_shape, device_free, size
    from .models import resolve_device, resolve_dtype
    from .weights import FP8, FormatError, check_format, parse_format

    plans = []
    for kind, settings in models:
        device = resolve_device(settings.device)
        dtype = str(resolve_dtype(settings.dtype, device)).replace("torch.", "")
        # An int8 calibration is made for the embedding model's weights as they are: advice keeps them.
        fixed = kind == EMBEDDING and config.int8_calibration is not None
        plans.append(Plan(kind, checkpoint_shape(directories[kind]), parse_format(settings.quantize), dtype, fixed))
    device = resolve_device(models[0][1].device)
    tokens = config.batching.max_batch_tokens or (CPU_BATCH_TOKENS if device.type == "cpu" else ACCELERATOR_BATCH_TOKENS)
    try:
        check_format(FP8, device)
        fp8_ok = True
    except FormatError:
        fp8_ok = False
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    free = device_free(device)
    estimates = check_fit(plans, tokens, free, config.memory_budget, bf16_ok, fp8_ok)
    log.info("memory estimate: %s, and %s to run a batch of %d tokens; %s", ", ".join(
        f"{e.kind} weights {size(e.weights_bytes)}" for e in estimates),
        size(max(e.working_bytes for e in estimates)), tokens, free.source)
    return {e.kind: e.weights_bytes for e in estimates}


def _load_fingerprinted(config: DaemonConfig, settings, kind: str, files: Path, step: Callable[..., None],
                        build: Callable[[Path], "_TorchBackend"],
                        before_build: Callable[[str, str], None] | None = None) -> "_TorchBackend":
    """The backend built by `build` from the model's files, its info carrying their fingerprint: the
    files are hashed first, loaded from that very directory, and checked unchanged once loaded.
    `before_build(files' fingerprint, the model's)` may refuse the model before its weights load."""
    step(f"fingerprinting {settings.name}", "fingerprint")
    found = fingerprint_directory(files, DigestCache(config.fingerprint_cache))
    _log_fingerprint(settings.name, found)
    served = weights_fingerprint(found.value, settings.quantize)
    if before_build is not None:
        before_build(found.value, served)
    step(f"loading {kind} model {settings.name}", "weights")
    backend = build(files)
    found.check_unchanged()
    backend.info = replace(backend.info, fingerprint=served)
    return backend


def _log_fingerprint(name: str, found: Fingerprint) -> None:
    log.info("%s: fingerprint %s (%d files, %.2f GB, %.2f GB hashed now, %.2f s)", name, found.value,
             found.files, found.bytes / 1e9, found.hashed_bytes / 1e9, found.seconds)


def _check_calibration_print(calibration: Calibration | None, settings, files_print: str, served: str) -> None:
    """Refuse, before the weights load, an int8 calibration made with another model, saying so when
    the files are the same and only the weight format differs."""
    from .weights import FORMATS, parse_format

    if calibration is None or calibration.fingerprint == served:
        return
    made_with = [f for f in FORMATS if weights_fingerprint(files_print, f) == calibration.fingerprint]
    why = (f": it was made with these same files in weight format {made_with[0]}, and the embedding model now runs "
           f"in {parse_format(settings.quantize)}; run it in {made_with[0]} (--embedding-quantize {made_with[0]}), "
           "or calibrate again" if made_with else
           "; run `qwen3vl-daemon calibrate` again for this model")
    raise ModelLoadError(f"the int8 calibration was made with embedding model fingerprint {calibration.fingerprint}, "
                         f"but {settings.name} has fingerprint {served}{why}")


def _check_calibration(calibration: Calibration | None, info: BackendInfo) -> None:
    if calibration is None:
        return
    beyond = [d for d in calibration.ranges if d > info.hidden_size]
    if beyond:
        raise ModelLoadError(f"the int8 calibration has ranges for dimension {beyond[0]}, but {info.name} returns at "
                             f"most {info.hidden_size}; run `qwen3vl-daemon calibrate` again for this model")


def _tokenizer_threads(backends: dict[str, Backend]) -> None:
    """A chunk of texts is tokenised in one call that releases the GIL. With the models on an
    accelerator, that call also spreads over the host's cores; with them on the CPU it does not,
    since its threads would take cores from the forward's own (an operator's
    TOKENIZERS_PARALLELISM wins either way)."""
    on_accelerator = any(backend.info.device != "cpu" for backend in backends.values())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if on_accelerator else "false")


def _check_dimension_setting(config: DaemonConfig, info: BackendInfo) -> None:
    dim = config.embedding_dim
    if dim is not None and not 1 <= dim <= info.hidden_size:
        raise ModelLoadError(f"embedding dimension {dim} is outside 1..{info.hidden_size} for {info.name}")
