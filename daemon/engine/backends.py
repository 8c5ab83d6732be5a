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

from daemon.bounded import BoundedCache
from daemon.config import DaemonConfig
from daemon.engine.residency import MemoryGate, Residency
from daemon.errors import ModelLoadError
from daemon.loading.catalog import ModelCard
from daemon.loading.fingerprint import DigestCache, Fingerprint, fingerprint_directory, model_directory, weights_fingerprint
from daemon.loading.weights_cache import WeightsCache
from daemon.outputs.encodings import Calibration
from qwen3vl_client.inputs import InputItem

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
    weights: str = "float32"  # the weight format: the dtype (unquantized), int8, nf4, fp8 or w8a8
    memory_bytes: int = 0  # what the model's parameters and buffers hold on its device
    memory_estimate_bytes: int | None = None  # what fit.py estimated before loading (weights only)
    task: str | None = None  # embedding | reranker


class Prepared(Protocol):
    tokens: int  # sequence length: what batching and padding are measured in


class Backend(Protocol):
    info: BackendInfo

    def prepare(self, work: Any) -> Prepared:
        """Model-ready input for one piece of work; RequestError for a bad input. Any thread."""

    def prepare_many(self, works: list) -> list[Prepared | Exception]:
        """`prepare` of each piece of work, or the exception it raised (one bad input fails only
        itself); work that can be prepared together is (one tokenizer call). Any thread."""

    def forward(self, batch: list[Prepared], between_layers: Callable[[], None] | None = None) -> Sequence[Any]:
        """One result per prepared input, in order (an array's rows, or a list). The model thread only.
        `between_layers`, when given, is called before each decoder layer (the vision tower's and the
        language model's): it may run other forwards, and the results must not change for it."""

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
        from daemon.loading.weights import model_bytes, weights_label

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

    def forward(self, batch: list, between_layers: Callable[[], None] | None = None):
        return self.model.embed(batch, between_layers).numpy()


class RerankerBackend(_TorchBackend):
    def prepare(self, work: RerankWork):
        return self.model.prepare(work.query, work.document, work.instruction)

    def prepare_many(self, works: list[RerankWork]) -> list:
        return self.model.prepare_many([(work.query, work.document, work.instruction) for work in works])

    def forward(self, batch: list, between_layers: Callable[[], None] | None = None):
        return self.model.score(batch, between_layers)


def load_model_backends(config: DaemonConfig, backends: dict[str, Backend], step: Callable[..., None],
                        calibration: Calibration | None = None, image_cache: BoundedCache | None = None,
                        models: Residency | None = None) -> None:
    """Find, fingerprint and estimate every configured model, register each with `models` (which
    loads it when asked), then load and warm up the default models unless the load mode is
    on-demand. `step(what, stage)` is called before each step, with the stage its time counts in
    (import, weights, fingerprint, warmup); it raises to stop loading between two steps. A model
    that cannot load (or fit) raises ModelLoadError, and so does an int8 `calibration` made with
    another model than the default embedding one. All models share `image_cache` (images' prepared
    pixels: their resize is the same). `backends` is left empty: every model lives in `models`."""
    from daemon.inputs.media_reader import MediaReader

    models = models if models is not None else Residency()
    step("importing torch and transformers", "import")
    from daemon.models import import_libraries

    import_libraries()
    media = MediaReader(config.media, image_cache)
    configured = config.models()
    step("finding the models' files", "weights")
    directories = [model_directory(s.name, s.local_files_only) for _, s, _ in configured]
    if not config.fit_check and config.memory_budget is not None:
        log.warning("--memory-budget is not enforced: --no-fit-check skips the checks that compare it")
    estimates = [None] * len(configured)
    if config.fit_check:  # before any weight is read
        step("estimating the models' memory", "weights")
        estimates = _check_fit(config, configured, directories)
    prints, reads = [], {}
    for (kind, settings, default), files in zip(configured, directories):
        step(f"fingerprinting {settings.name}", "fingerprint")
        found, reads[kind, settings.served_name] = _fingerprint(config, kind, settings, default, files, step)
        _log_fingerprint(settings.name, found)
        if kind == EMBEDDING and default:
            _check_calibration_print(calibration, settings, found.value, weights_fingerprint(found.value,
                                                                                            settings.quantize))
        prints.append(found)
    for (kind, settings, default), files, found, estimate in zip(configured, directories, prints, estimates):
        card = _card(config, kind, settings, default, files, found, estimate)
        models.register(card, lambda step, k=kind, s=settings, f=found, c=card: _build(
            config, k, s, f, c, media, calibration, step, reads.pop((k, s.served_name), None)))
    _tokenizer_threads(models.cards())
    if config.load == "at-start":
        for card in models.cards():
            if card.default:
                models.load_now(card.key, step)


def weights_cache(config: DaemonConfig) -> WeightsCache | None:
    """Where quantized models are kept as converted (None: off, or no fingerprint cache to sit beside)."""
    directory = config.weights_cache_directory()
    return WeightsCache(directory, config.fingerprint_cache) if directory is not None else None


def memory_gate(config: DaemonConfig) -> MemoryGate | None:
    """What every load on demand is checked against: the device's free memory and the budget."""
    if not config.fit_check:
        return None
    configured = config.models()
    spec = configured[0][1].device if configured else "cpu"

    def free() -> tuple[int, str]:
        from daemon.loading.fit import device_free
        from daemon.loading.devices import resolve_device

        found = device_free(resolve_device(spec))
        return found.bytes, found.source

    return MemoryGate(config.memory_budget, free)


def _card(config: DaemonConfig, kind: str, settings, default: bool, files: Path, found: Fingerprint,
          estimate) -> ModelCard:
    from daemon.loading.devices import resolve_device
    from daemon.loading.preflight import hidden_size

    hidden = hidden_size(files) if kind == EMBEDDING else None
    card = ModelCard(name=settings.served_name, task=kind, source=settings.name, default=default,
                     fingerprint=weights_fingerprint(found.value, settings.quantize), max_length=settings.max_length,
                     hidden_size=hidden, keep_alive_s=settings.keep_alive_s,
                     estimate_bytes=estimate.weights_bytes if estimate else None,
                     working_bytes=max(estimate.working_bytes, estimate.transient_bytes) if estimate else 0,
                     device=str(resolve_device(settings.device)))
    if kind == EMBEDDING and hidden is not None:
        _check_dimension_setting(config, card)
    return card


def _fingerprint(config: DaemonConfig, kind: str, settings, default: bool, files: Path, step):
    """(the model's Fingerprint, its weights' read or None). A default model loaded at start in its
    compute dtype is read from here on, in the background, so that the models' reads overlap each
    other and the loading of the models before them; weight files the digest cache does not know
    are hashed as their bytes pass (the fingerprint waits for that): a first start reads each file
    once. Quantized models (converted, then kept in the weights cache) and models loaded later are
    hashed here, their files read when they load."""
    from daemon.loading.fingerprint import loaded_weight_files
    from daemon.models import EmbeddingModel, RerankerModel
    from daemon.loading.weights import NONE, parse_format

    read_now = config.load == "at-start" and default and parse_format(settings.quantize) == NONE
    defer = frozenset(str(p.relative_to(files)) for p in loaded_weight_files(files)) if read_now else frozenset()
    digests = DigestCache(config.fingerprint_cache)
    found = fingerprint_directory(files, digests, defer)
    if not read_now:
        return found, None
    model_cls = EmbeddingModel if kind == EMBEDDING else RerankerModel
    weights = model_cls.read_weights(settings, files, found, hash_unknown=bool(found.pending))
    if not found.pending:
        return found, weights
    step(f"reading and fingerprinting {settings.name}", "weights")
    return found.completed(weights.hashed(), digests), weights


def _build(config: DaemonConfig, kind: str, settings, found: Fingerprint, card: ModelCard, media,
           calibration: Calibration | None, step: Callable[..., None], weights=None) -> "_TorchBackend":
    """One model loaded from the very files fingerprinted at start (or from `weights`, their read
    begun at start), checked unchanged since then, and warmed up. Any thread; ModelLoadError for
    what an operator can act on."""
    from daemon.models import EmbeddingModel, RerankerModel

    step(f"loading {kind} model {settings.name}", "weights")
    cache = weights_cache(config)
    if kind == EMBEDDING:
        backend: _TorchBackend = EmbeddingBackend(EmbeddingModel(settings, media, found.directory, found, cache,
                                                                 weights))
    else:
        backend = RerankerBackend(RerankerModel(settings, media, found.directory, found, cache, weights))
    found.check_unchanged("after the daemon fingerprinted it at start",
                          "start the daemon again once the model's files are written, so that its fingerprint "
                          "is theirs")
    backend.model.keep_converted()  # its files are those fingerprinted: the weights cache may keep it
    backend.info = replace(backend.info, fingerprint=card.fingerprint, memory_estimate_bytes=card.estimate_bytes,
                           task=kind)
    if kind == EMBEDDING:
        if backend.info.hidden_size is not None and card.hidden_size is None:
            _check_dimension_setting(config, backend.info)
        if calibration is not None and calibration.fingerprint == card.fingerprint:
            _check_calibration(calibration, backend.info)
    if config.warmup:
        step(f"warming up the {kind} model {card.name}", "warmup")
        backend.warmup()
    return backend


def _check_fit(config: DaemonConfig, configured: list, directories: list[Path]) -> list:
    """Each model's estimate from its files' headers (fit.py); ModelLoadError, with what would fit,
    when the models loaded at start (with a batch's working memory) exceed what the device has free
    or the operator's --memory-budget, or when any other model would not fit even alone."""
    import torch

    from daemon.engine.batching import ACCELERATOR_BATCH_TOKENS, CPU_BATCH_TOKENS
    from daemon.loading.fit import Plan, check_fit, checkpoint_shape, device_free, plan_estimates, size
    from daemon.loading.devices import resolve_device, resolve_dtype
    from daemon.loading.weights import FP8, FormatError, check_format, parse_format

    plans = []
    for (kind, settings, default), files in zip(configured, directories):
        device = resolve_device(settings.device)
        dtype = str(resolve_dtype(settings.dtype, device)).replace("torch.", "")
        # An int8 calibration is made for the default embedding model's weights as they are: advice keeps them.
        fixed = kind == EMBEDDING and default and config.int8_calibration is not None
        plans.append(Plan(kind, checkpoint_shape(files), parse_format(settings.quantize), dtype, fixed))
    device = resolve_device(configured[0][1].device)
    tokens = config.batching.max_batch_tokens or (CPU_BATCH_TOKENS if device.type == "cpu" else ACCELERATOR_BATCH_TOKENS)
    try:
        check_format(FP8, device)
        fp8_ok = True
    except FormatError:
        fp8_ok = False
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    free = device_free(device)
    at_start = [i for i, (_, _, default) in enumerate(configured) if default and config.load == "at-start"]
    if at_start:
        check_fit([plans[i] for i in at_start], tokens, free, config.memory_budget, bf16_ok, fp8_ok)
    for i, (kind, settings, _) in enumerate(configured):
        if i not in at_start:
            try:
                check_fit([plans[i]], tokens, free, config.memory_budget, bf16_ok, fp8_ok)
            except ModelLoadError as exc:
                raise ModelLoadError(f"the {kind} model {settings.served_name!r} would not fit even alone: {exc}"
                                     ) from None
    found = plan_estimates(plans, tokens)
    log.info("memory estimate: %s, and %s to run a batch of %d tokens; %s", ", ".join(
        f"{s.served_name} weights {size(e.weights_bytes)}" for (_, s, _), e in zip(configured, found)),
        size(max(e.working_bytes for e in found)), tokens, free.source)
    return found


def _log_fingerprint(name: str, found: Fingerprint) -> None:
    log.info("%s: fingerprint %s (%d files, %.2f GB, %.2f GB hashed now, %.2f s)", name, found.value,
             found.files, found.bytes / 1e9, found.hashed_bytes / 1e9, found.seconds)


def _check_calibration_print(calibration: Calibration | None, settings, files_print: str, served: str) -> None:
    """Refuse, before the weights load, an int8 calibration made with another model, saying so when
    the files are the same and only the weight format differs."""
    from daemon.loading.weights import FORMATS, parse_format

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


def _tokenizer_threads(cards: list[ModelCard]) -> None:
    """A chunk of texts is tokenised in one call that releases the GIL. With the models on an
    accelerator, that call also spreads over the host's cores; with them on the CPU it does not,
    since its threads would take cores from the forward's own (an operator's
    TOKENIZERS_PARALLELISM wins either way)."""
    on_accelerator = any(card.device != "cpu" for card in cards)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if on_accelerator else "false")


def _check_dimension_setting(config: DaemonConfig, info) -> None:
    """--embedding-dim is every embedding model's default dimension: within each one's size."""
    dim = config.embedding_dim
    if dim is not None and not 1 <= dim <= info.hidden_size:
        raise ModelLoadError(f"embedding dimension {dim} is outside 1..{info.hidden_size} for {info.name}")
