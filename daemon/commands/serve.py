"""`serve`: load the models and serve the socket. Every option can also come from the environment
(`QWEN3VL_*`); the old sidecar's `EMBEDDING_MODEL`, `RERANKER_MODEL`, `EMBEDDING_DIM` and `DEVICE` are
honoured too. `config_from_options` makes the typed DaemonConfig of them."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import click

from daemon.config import (Batching, DaemonConfig, DEFAULT_EMBEDDING_MODEL, DEFAULT_RERANKER_MODEL,
                           EMBEDDING_MAX_LENGTH, LOAD_MODES, MediaPolicy, ModelSettings, RERANKER_MAX_LENGTH,
                           is_disabled, show_envvars)
from daemon.loading.catalog import CatalogError, apply_settings, check_names, parse_duration, split_spec
from daemon.logs import quiet_libraries
from qwen3vl_client.endpoints import default_endpoint
from qwen3vl_client.limits import Limits


class ModelList(click.ParamType):
    """A model option's value: `PATH_OR_HUB_ID` or `NAME=PATH_OR_HUB_ID`; in the environment, several
    separated by commas."""

    envvar_list_splitter = ","

    def __init__(self, metavar: str = "[NAME=]MODEL"):
        self.name = metavar

    def get_metavar(self, param, ctx=None) -> str:
        return self.name

    def split_envvar_value(self, rv: str):
        return [part.strip() for part in rv.split(",") if part.strip()]


def _models(flag: str, specs: tuple[str, ...], make) -> list[ModelSettings]:
    """The models of one kind, the default first. 'none' drops the models given before it (so a
    `--reranker-model none` appended to a command line disables the kind, as when one value was kept)."""
    disabled = [i for i, spec in enumerate(specs) if is_disabled(spec)]
    if disabled:
        specs = specs[disabled[-1] + 1:]
    try:
        named = [split_spec(spec) for spec in specs]
    except CatalogError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from None
    return [make(source, alias) for alias, source in named]


OMP_WAIT_POLICY = "PASSIVE"  # the daemon's default (see `serve`)


def _limit(flag: str, kind, default, help: str):
    """A `serve` option for one limit, with its QWEN3VL_* environment variable."""
    env = "QWEN3VL_" + flag.lstrip("-").replace("-", "_").upper()
    return click.option(flag, envvar=env, type=kind, default=default, show_default=True, help=help)


# Defaults come from the dataclasses, so the CLI and the library cannot disagree.
LIMIT_OPTIONS = [
    _limit("--max-message-bytes", click.IntRange(min=1024), Limits.max_message_bytes,
           "Largest request message (set on the socket)."),
    _limit("--max-inputs", click.IntRange(min=1), Limits.max_inputs,
           "Inputs per embed request."),
    _limit("--max-documents", click.IntRange(min=1), Limits.max_documents,
           "Documents per rerank request."),
    _limit("--max-text-chars", click.IntRange(min=1), Limits.max_text_chars,
           "Characters per text or instruction."),
    _limit("--max-msgpack-depth", click.IntRange(min=6), Limits.max_msgpack_depth,
           "Nesting of msgpack arrays and maps in a request."),
    _limit("--max-msgpack-items", click.IntRange(min=16), Limits.max_msgpack_items,
           "Items in one msgpack array or map."),
    _limit("--max-image-pixels", click.IntRange(min=1), MediaPolicy.max_image_pixels,
           "Pixels of an image or video frame (from its header)."),
    _limit("--max-image-bytes", click.IntRange(min=1), MediaPolicy.max_image_bytes,
           "Bytes of an image read by path or URL."),
    _limit("--max-video-bytes", click.IntRange(min=1), MediaPolicy.max_video_bytes,
           "Bytes of a video file read by path or URL."),
    _limit("--max-video-frames", click.IntRange(min=1), MediaPolicy.max_video_frames,
           "Frames of a video sent as a frame list."),
    _limit("--max-video-seconds", click.FloatRange(min=0), MediaPolicy.max_video_seconds,
           "Duration of a video file (from its header)."),
    _limit("--max-video-pixels", click.IntRange(min=1), MediaPolicy.max_video_pixels,
           "Decoded pixels of one video's sampled frames in all (from headers)."),
    _limit("--url-timeout", click.FloatRange(min=0.1), MediaPolicy.url_timeout_s,
           "Seconds for one whole URL download."),
]


def _limit_options(fn):
    for option in reversed(LIMIT_OPTIONS):
        fn = option(fn)
    return fn


def _metrics_address(ctx, param, value: str | None) -> str | None:
    if value is None or not value.strip() or is_disabled(value):
        return None
    from daemon.serving.prometheus import split_address

    try:
        split_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[1]) from None
    return value.strip()


@click.command()
@click.option("--endpoint", envvar="QWEN3VL_ENDPOINT", default=default_endpoint, show_default="$RUNTIME_DIRECTORY, "
              "$XDG_RUNTIME_DIR or the temp dir, then qwen3vl/daemon.sock", help="ZeroMQ endpoint to bind.")
@click.option("--embedding-model", "embedding_models", envvar=["QWEN3VL_EMBEDDING_MODEL", "EMBEDDING_MODEL"],
              type=ModelList(), multiple=True, default=[DEFAULT_EMBEDDING_MODEL], show_default=True,
              help="Hub id or directory, as NAME=MODEL to name it (default name: its last part); repeatable "
                   "(comma-separated in the env), the first is the default; 'none' disables.")
@click.option("--reranker-model", "reranker_models", envvar=["QWEN3VL_RERANKER_MODEL", "RERANKER_MODEL"],
              type=ModelList(), multiple=True, default=[DEFAULT_RERANKER_MODEL], show_default=True,
              help="Like --embedding-model, for rerankers.")
@click.option("--model-setting", "model_settings", envvar="QWEN3VL_MODEL_SETTINGS", type=ModelList("NAME.KEY=VALUE"),
              multiple=True,
              help="One model's own setting, NAME.KEY=VALUE (repeatable; comma-separated in the env); KEY is "
                   "dtype, quantize, max-length, keep-alive or attn-implementation, e.g. big.quantize=int8.")
@click.option("--keep-alive", envvar="QWEN3VL_KEEP_ALIVE", default="forever", show_default=True,
              help="Unload a model idle this long (30s, 10m, 2h, 0: once idle, forever); it loads again when asked.")
@click.option("--load", "load_mode", envvar="QWEN3VL_LOAD", type=click.Choice(LOAD_MODES), default=DaemonConfig.load,
              show_default=True, help="at-start: ready once the default models are loaded; on-demand: ready once "
                                      "the models' files are fingerprinted, each loaded when first asked for.")
@click.option("--embedding-dim", envvar=["QWEN3VL_EMBEDDING_DIM", "EMBEDDING_DIM"], type=click.IntRange(min=1),
              default=None, help="Default output dimension (Matryoshka); the model's size if unset.")
@click.option("--device", envvar=["QWEN3VL_DEVICE", "DEVICE"], default=ModelSettings.device, show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--dtype", envvar="QWEN3VL_DTYPE", default=ModelSettings.dtype, show_default=True,
              help="auto (bfloat16 on CUDA, MPS and CPUs with native bf16 (AVX512-BF16, AMX), else float32), "
                   "bfloat16, float32 or float16.")
@click.option("--quantize", envvar="QWEN3VL_QUANTIZE", default=ModelSettings.quantize, show_default=True,
              help="Language model weights: none (the dtype), int8, nf4, fp8 (CUDA 8.9+; these three need the "
                   "[quant] extra), or w8a8 (computed in int8: x86 CPUs with AVX2 or newer, CUDA).")
@click.option("--embedding-quantize", envvar="QWEN3VL_EMBEDDING_QUANTIZE", default=None,
              help="--quantize for the embedding model only.")
@click.option("--reranker-quantize", envvar="QWEN3VL_RERANKER_QUANTIZE", default=None,
              help="--quantize for the reranker only.")
@click.option("--memory-budget", envvar="QWEN3VL_MEMORY_BUDGET", default=None,
              help="Most memory the models may take on their device (bytes, or 12G, 512M); the start stops "
                   "before loading when the estimate exceeds it or the device's free memory, and a load on "
                   "demand first unloads the least recently used idle model to make room.")
@click.option("--fit-check/--no-fit-check", envvar="QWEN3VL_FIT_CHECK", default=DaemonConfig.fit_check,
              show_default=True, help="Compare the models' estimated memory with what is free before loading.")
@click.option("--attn-implementation", envvar="QWEN3VL_ATTN_IMPLEMENTATION", default=ModelSettings.attn_implementation,
              show_default=True,
              help="Attention kernels: sdpa, eager, or flash_attention_2 where installed.")
@click.option("--embedding-max-length", envvar="QWEN3VL_EMBEDDING_MAX_LENGTH", type=click.IntRange(min=16),
              default=EMBEDDING_MAX_LENGTH, show_default=True,
              help="Tokens per input; longer text is truncated (official).")
@click.option("--reranker-max-length", envvar="QWEN3VL_RERANKER_MAX_LENGTH", type=click.IntRange(min=16),
              default=RERANKER_MAX_LENGTH, show_default=True,
              help="Tokens per query-document pair; longer is truncated.")
@click.option("--max-batch-size", envvar="QWEN3VL_MAX_BATCH_SIZE", type=click.IntRange(min=1),
              default=Batching.max_batch_size, show_default=True, help="Inputs per forward pass.")
@click.option("--max-batch-tokens", envvar="QWEN3VL_MAX_BATCH_TOKENS", type=click.IntRange(min=64), default=None,
              help="Padded tokens per forward pass (batch size x longest input); default 1024 on CPU, 32768 on GPU.")
@click.option("--max-wait-ms", envvar="QWEN3VL_MAX_WAIT_MS", type=click.FloatRange(min=0),
              default=Batching.max_wait_ms, show_default=True,
              help="Longest a ready input waits for others still being preprocessed.")
@click.option("--batch-share", envvar="QWEN3VL_BATCH_SHARE", type=click.FloatRange(min=0.01, max=0.99),
              default=Batching.batch_share, show_default=True,
              help="The least share of the model's time that waiting priority=batch work gets while interactive "
                   "requests keep coming (they otherwise go first).")
@click.option("--preempt/--no-preempt", envvar="QWEN3VL_PREEMPT", default=Batching.preempt, show_default=True,
              help="Run interactive requests between two decoder layers of a running priority=batch forward "
                   "instead of after it.")
@click.option("--prep-workers", envvar="QWEN3VL_PREP_WORKERS", type=click.IntRange(min=1), default=None,
              help="Preprocessing threads (default: half the CPUs, at most 4).")
@click.option("--max-queued-inputs", envvar="QWEN3VL_MAX_QUEUED_INPUTS", type=click.IntRange(min=1),
              default=Batching.max_queued_inputs, show_default=True,
              help="Queued inputs/documents beyond which requests get `overloaded`.")
@click.option("--max-queued-tokens", envvar="QWEN3VL_MAX_QUEUED_TOKENS", type=click.IntRange(min=1),
              default=Batching.max_queued_tokens, show_default=True,
              help="Estimated queued tokens beyond which: overloaded.")
@click.option("--cache-bytes", envvar="QWEN3VL_CACHE_BYTES", type=click.IntRange(min=0),
              default=Batching.cache_bytes, show_default=True, help="Embedding cache size in bytes; 0 disables it.")
@click.option("--image-cache-bytes", envvar="QWEN3VL_IMAGE_CACHE_BYTES", type=click.IntRange(min=0),
              default=Batching.image_cache_bytes, show_default=True,
              help="Images' prepared pixels kept by content (an image sent again skips decoding); 0 disables it.")
@_limit_options
@click.option("--allow-path", "allow_paths", envvar="QWEN3VL_ALLOW_PATHS", multiple=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory clients may read media from (repeatable; ':'-separated in the env). None by default.")
@click.option("--allow-urls/--no-allow-urls", envvar="QWEN3VL_ALLOW_URLS", default=False, show_default=True,
              help="Let clients name http(s) media URLs (public addresses only).")
@click.option("--allow-private-urls/--no-allow-private-urls", envvar="QWEN3VL_ALLOW_PRIVATE_URLS", default=False,
              show_default=True, help="With --allow-urls: also loopback, link-local and private addresses.")
@click.option("--offline", envvar=["QWEN3VL_OFFLINE", "HF_HUB_OFFLINE"], is_flag=True, default=False,
              help="Never download; load only local files.")
@click.option("--curve-secret-key", envvar="QWEN3VL_CURVE_SECRET_KEY", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Server secret key file: CURVE-encrypt and authenticate a tcp:// endpoint.")
@click.option("--curve-authorized-keys", envvar="QWEN3VL_CURVE_AUTHORIZED_KEYS",
              type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of client public keys allowed to connect (with --curve-secret-key).")
@click.option("--socket-mode", envvar="QWEN3VL_SOCKET_MODE", default=f"{DaemonConfig.socket_mode:04o}",
              show_default=True,
              help="Permissions of an ipc socket file, octal; 0660 lets the daemon's group connect.")
@click.option("--drain-timeout", envvar="QWEN3VL_DRAIN_TIMEOUT", type=click.FloatRange(min=0),
              default=DaemonConfig.drain_timeout_s, show_default=True,
              help="Seconds to finish accepted requests after SIGTERM.")
@click.option("--fingerprint-cache", envvar="QWEN3VL_FINGERPRINT_CACHE", default=None,
              show_default="fingerprints.json under $CACHE_DIRECTORY, else ~/.cache/qwen3vl-daemon",
              help="File that keeps model files' digests between starts, so a restart hashes nothing; 'none' "
                   "hashes every start.")
@click.option("--weights-cache/--no-weights-cache", envvar="QWEN3VL_WEIGHTS_CACHE", default=DaemonConfig.weights_cache,
              show_default=True,
              help="Keep quantized models (int8, nf4, w8a8) as converted in weights/ beside the fingerprint cache, "
                   "so a restart or a reload loads them directly (each entry checked against its own digest).")
@click.option("--int8-calibration", envvar="QWEN3VL_INT8_CALIBRATION", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="int8/uint8 ranges from `qwen3vl-daemon calibrate`; without it, a fixed scale for unit vectors.")
@click.option("--warmup/--no-warmup", envvar="QWEN3VL_WARMUP", default=DaemonConfig.warmup, show_default=True,
              help="Run one short forward per model before reporting ready.")
@click.option("--metrics-address", envvar="QWEN3VL_METRICS_ADDRESS", default=None, callback=_metrics_address,
              help="HOST:PORT to serve Prometheus /metrics on (queue depth, readiness, per model; for an "
                   "autoscaler); default: none.")
@click.option("--log-level", envvar="QWEN3VL_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="Log verbosity.")
@click.option("--log-stream", envvar="QWEN3VL_LOG_STREAM", default="stderr", show_default=True,
              type=click.Choice(["stderr", "stdout"]), help="Where log lines go (a container's: stdout).")
def serve(log_level: str, log_stream: str, **opts) -> None:
    """Load the models and serve requests on ENDPOINT until SIGTERM."""
    # Before torch (and its OpenMP runtime) is imported: idle OpenMP threads sleep rather than spin.
    # Spinning ones fight any other busy process for the cores, and then a 1-text request took
    # ~0.25 s instead of ~5 ms (bench.contention). Sleeping at once costs a lone forward a wake-up
    # per op (5% of the 2B model's w8a8 query idle), but a short spin (GOMP_SPINCOUNT=10000, ~0.1 ms)
    # brought the busy-machine loss back (that query 1.5x slower beside two busy processes: bench.lone),
    # so it is the operator's choice for a dedicated machine; an operator's own values win.
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    from daemon.loading.preflight import SettingsError, check_config
    from daemon.serving.server import Server, StartupError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout if log_stream == "stdout" else sys.stderr)
    quiet_libraries()
    config = config_from_options(opts)
    try:
        # The server first: it binds nothing yet, and it reads the int8 calibration, which needs no
        # library, so a wrong file costs milliseconds, not check_config's import of torch.
        server = Server(config)
        check_config(config)
        server.install_signal_handlers()
        code = server.serve()
    except (SettingsError, StartupError) as exc:
        click.echo(f"qwen3vl-daemon: {exc}", err=True)
        sys.exit(1)
    if server.engine.loader_running:  # stopped mid-step: exit now, not when (or if) that step ends
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


show_envvars(serve)


def config_from_options(o: dict) -> DaemonConfig:
    """The typed configuration from `serve`'s options (named as click passes them)."""
    try:
        keep_alive = parse_duration(o["keep_alive"])
    except CatalogError as exc:
        raise click.BadParameter(str(exc), param_hint="--keep-alive") from None

    def kind(flag: str, specs: tuple[str, ...], max_length: int, quantize: str | None) -> list[ModelSettings]:
        return _models(flag, specs, lambda source, alias: ModelSettings(
            name=source, device=o["device"], dtype=o["dtype"], attn_implementation=o["attn_implementation"],
            max_length=max_length, local_files_only=o["offline"], quantize=quantize or o["quantize"], alias=alias,
            keep_alive_s=keep_alive))

    embedding = kind("--embedding-model", o["embedding_models"], o["embedding_max_length"], o["embedding_quantize"])
    reranker = kind("--reranker-model", o["reranker_models"], o["reranker_max_length"], o["reranker_quantize"])
    try:
        check_names([("embedding", m) for m in embedding] + [("reranker", m) for m in reranker])
    except CatalogError as exc:
        raise click.BadParameter(str(exc), param_hint="--embedding-model/--reranker-model") from None
    try:
        every = apply_settings(embedding + reranker, o["model_settings"])
    except CatalogError as exc:
        raise click.BadParameter(str(exc), param_hint="--model-setting") from None
    embedding, reranker = every[:len(embedding)], every[len(embedding):]

    roots = tuple(Path(p) for entry in o["allow_paths"] for p in str(entry).split(":") if p)
    media = MediaPolicy(
        allowed_roots=roots, allow_urls=o["allow_urls"], allow_private_urls=o["allow_private_urls"],
        url_timeout_s=o["url_timeout"], max_image_bytes=o["max_image_bytes"], max_video_bytes=o["max_video_bytes"],
        max_image_pixels=o["max_image_pixels"], max_video_frames=o["max_video_frames"],
        max_video_seconds=o["max_video_seconds"], max_video_pixels=o["max_video_pixels"])
    limits = Limits(max_message_bytes=o["max_message_bytes"], max_inputs=o["max_inputs"],
                    max_documents=o["max_documents"], max_text_chars=o["max_text_chars"],
                    max_msgpack_depth=o["max_msgpack_depth"], max_msgpack_items=o["max_msgpack_items"])
    batching = Batching(max_batch_size=o["max_batch_size"], max_batch_tokens=o["max_batch_tokens"],
                        max_wait_ms=o["max_wait_ms"], max_queued_inputs=o["max_queued_inputs"],
                        batch_share=o["batch_share"], preempt=o["preempt"],
                        max_queued_tokens=o["max_queued_tokens"], cache_bytes=o["cache_bytes"],
                        image_cache_bytes=o["image_cache_bytes"],
                        **({"prep_workers": o["prep_workers"]} if o["prep_workers"] else {}))
    return DaemonConfig(
        endpoint=o["endpoint"],
        embedding=embedding[0] if embedding else None, more_embedding=tuple(embedding[1:]),
        reranker=reranker[0] if reranker else None, more_reranker=tuple(reranker[1:]), load=o["load_mode"],
        memory_budget=_bytes(o["memory_budget"], "--memory-budget"), fit_check=o["fit_check"],
        embedding_dim=o["embedding_dim"], media=media, limits=limits, batching=batching, warmup=o["warmup"],
        socket_mode=_octal(o["socket_mode"]), curve_secret_key=o["curve_secret_key"],
        curve_authorized_keys=o["curve_authorized_keys"], drain_timeout_s=o["drain_timeout"],
        int8_calibration=o["int8_calibration"], metrics_address=o["metrics_address"],
        weights_cache=o["weights_cache"], **_fingerprint_cache(o["fingerprint_cache"]),
    )


def _fingerprint_cache(value: str | None) -> dict:
    """The config field for --fingerprint-cache: unset keeps the default, 'none' disables it."""
    if value is None:
        return {}
    return {"fingerprint_cache": None if is_disabled(value) else Path(value)}


SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(text: str | None, flag: str) -> int | None:
    """A size: plain bytes, or with K, M, G or T (binary: 12G is 12 GiB); unset or 'none': None."""
    if text is None or is_disabled(text):
        return None
    found = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,6})?)\s*([kmgt]?)(?:i?b)?\s*", text.lower(), re.ASCII)
    value = int(float(found.group(1)) * SIZE_UNITS[found.group(2)]) if found else 0
    if value < 1:
        raise click.BadParameter(f"{text!r} is not a size of at least a byte (bytes, or a number with K, M, G or "
                                 "T: 12G is 12 GiB)", param_hint=flag)
    return value


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an octal mode", param_hint="--socket-mode") from None
    if mode & 0o007:
        raise click.BadParameter("the socket must not be reachable by other users", param_hint="--socket-mode")
    return mode

