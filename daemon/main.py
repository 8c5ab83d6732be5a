"""The command line: `serve`, `tiny-checkpoint`, `keygen`, and the client commands `embed`, `rerank`,
`health` and `calibrate`.

Every `serve` option can also come from the environment (`QWEN3VL_*`); the old sidecar's
`EMBEDDING_MODEL`, `RERANKER_MODEL`, `EMBEDDING_DIM` and `DEVICE` are honoured too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from daemon import __version__
from qwen3vl_client.client import Client, CurveKeys, DaemonError, DaemonTimeout, DaemonUnavailable, DEFAULT_TIMEOUT_S
from daemon.loading.catalog import CatalogError, apply_settings, check_names, parse_duration, split_spec
from daemon.config import (Batching, DaemonConfig, DEFAULT_EMBEDDING_MODEL, DEFAULT_RERANKER_MODEL,
                           EMBEDDING_MAX_LENGTH, LOAD_MODES, MediaPolicy, ModelSettings, RERANKER_MAX_LENGTH,
                           is_disabled, show_envvars)
from qwen3vl_client.endpoints import client_endpoint, default_endpoint
from qwen3vl_client.limits import Limits
from qwen3vl_client.fields import INTERACTIVE, PRIORITIES
from daemon.logs import quiet_libraries


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


@click.group()
@click.version_option(__version__)
def cli() -> None:
    """Qwen3-VL embedding and reranking daemon."""


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


@cli.command()
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


@cli.command("tiny-checkpoint")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def tiny_checkpoint(directory: Path) -> None:
    """Write a tiny random-weight Qwen3-VL checkpoint to DIRECTORY (offline; for tests, not for use)."""
    from daemon.loading.tiny import build_tiny_checkpoint

    quiet_libraries()
    click.echo(str(build_tiny_checkpoint(directory)))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="server", show_default=True, help="Key name: NAME.key (public), NAME.key_secret.")
def keygen(directory: Path, name: str) -> None:
    """Write a CURVE key pair to DIRECTORY (for tcp:// endpoints across hosts).

    The daemon takes the server's NAME.key_secret (--curve-secret-key) and a directory holding each
    client's public NAME.key (--curve-authorized-keys); a client takes the server's public key and its
    own secret key (--curve-server-key, --curve-client-key).
    """
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    click.echo(f"{public}\n{secret}")


# -- client commands -------------------------------------------------------------------------------
def _client_options(fn):
    fn = click.option("--endpoint", envvar="QWEN3VL_ENDPOINT", default=client_endpoint,
                      show_default="this user's socket if it exists, else the service's /run/qwen3vl/daemon.sock",
                      help="Daemon endpoint; several, comma-separated, spread the requests; dns+tcp://HOST:PORT: every "
                           "address of HOST, looked up again every $QWEN3VL_DNS_REFRESH s.")(fn)
    fn = click.option("--curve-server-key", envvar="QWEN3VL_CURVE_SERVER_KEY", default=None,
                      type=click.Path(exists=True, dir_okay=False), help="The daemon's public key file (CURVE).")(fn)
    fn = click.option("--curve-client-key", envvar="QWEN3VL_CURVE_CLIENT_KEY", default=None,
                      type=click.Path(exists=True, dir_okay=False), help="This client's secret key file (CURVE).")(fn)
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT_S,
                        show_default=True, help="Seconds to wait for the reply (also sent as the request's deadline).")(fn)


def _run_client(call, names: dict[str, str] | None = None):
    """Run `call(client)`; a failure is one line, with the inputs' wire names (inputs[0].image[1])
    replaced by the files they came from."""
    def runner(endpoint: str, timeout: float, curve_server_key: str | None, curve_client_key: str | None):
        curve = CurveKeys.from_files(curve_server_key, curve_client_key) if curve_server_key else None
        # A failed DNS lookup is in the one error line below; the discovery's own warning is not printed.
        logging.getLogger("qwen3vl.discovery").addHandler(logging.NullHandler())
        try:
            client = Client(endpoint, timeout=timeout, curve=curve)
        except ValueError as exc:  # a malformed dns+tcp:// endpoint or QWEN3VL_DNS_REFRESH
            click.echo(f"qwen3vl-daemon: {exc}", err=True)
            sys.exit(1)
        with client:
            try:
                return call(client)
            except (DaemonError, DaemonTimeout, DaemonUnavailable) as exc:
                click.echo(f"qwen3vl-daemon: {_name_files(str(exc), names or {})}", err=True)
                sys.exit(1)
    return runner


def _name_files(message: str, names: dict[str, str]) -> str:
    if not names:
        return message
    pattern = "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))
    return re.sub(pattern, lambda m: f"{names[m.group(0)]} ({m.group(0)})", message)


def embed_inputs(texts: tuple[str, ...], images: tuple[Path, ...], videos: tuple[Path, ...],
                 frames: tuple[Path, ...], separate: bool) -> tuple[list, dict[str, str]]:
    """The wire inputs and, for each file, its wire name. Texts alone: one input each. With media:
    one input made of every text, image and video, unless `separate` (then one input per item)."""
    media: list[tuple[str, object, Path | None]] = [("image", p.read_bytes(), p) for p in images]
    media += [("video", {"data": p.read_bytes()}, p) for p in videos]
    if frames:
        media.append(("video", [p.read_bytes() for p in frames], None))
    together = bool(media) and not separate
    items: list = [{"text": list(texts)} if texts else {}] if together else list(texts)
    names: dict[str, str] = {}
    for kind, value, path in media:
        if together:
            index, values = 0, items[0].setdefault(kind, [])
        else:
            index, values = len(items), []
            items.append({kind: values})
        where = f"inputs[{index}].{kind}[{len(values)}]"
        values.append(value)
        names.update({f"{where}.frames[{i}]": str(p) for i, p in enumerate(frames)} if path is None
                     else {where: str(path)})
    return items, names


FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
PRIORITY_OPTION = click.option("--priority", type=click.Choice(PRIORITIES), default=INTERACTIVE, show_default=True,
                               help="batch: bulk work that yields to interactive requests (PROTOCOL.md).")


@cli.command()
@click.argument("texts", nargs=-1)
@click.option("--image", "images", multiple=True, type=FILE, help="Image file (repeatable).")
@click.option("--video", "videos", multiple=True, type=FILE, help="Video file (repeatable).")
@click.option("--frame", "frames", multiple=True, type=FILE,
              help="Image file as one frame of a video given as frames (repeatable, in order).")
@click.option("--separate", is_flag=True, default=False,
              help="Embed every text and file on its own instead of as one input.")
@click.option("--instruction", default=None, help="Task instruction (default: \"Represent the user's input.\").")
@click.option("--dimension", type=click.IntRange(min=1), default=None, help="Output dimension (Matryoshka).")
@click.option("--encoding", type=click.Choice(["float32", "int8", "uint8", "binary", "ubinary"]), default="float32",
              show_default=True, help="Vector type: compact types print integers (binary: packed sign bits).")
@click.option("--expect-fingerprint", default=None,
              help="Refuse unless the model has this fingerprint (health); without --model, the model that has it.")
@click.option("--model", default=None, help="The daemon's model of this name (health lists them); default: its default.")
@PRIORITY_OPTION
@_client_options
def embed(texts, images, videos, frames, separate, instruction, dimension, encoding, expect_fingerprint, model,
          priority, endpoint, timeout, curve_server_key, curve_client_key) -> None:
    """Embed TEXTS and media; prints JSON.

    Texts alone are one input each. With --image, --video or --frame, the texts and media make one
    input (one vector), unless --separate."""
    if not (texts or images or videos or frames):
        raise click.UsageError("give at least one text, --image, --video or --frame")
    inputs, names = embed_inputs(texts, images, videos, frames, separate)
    result = _run_client(lambda c: c.embed(inputs, instruction, dimension, encoding=encoding,
                                           expect_fingerprint=expect_fingerprint, model=model,
                                           priority=priority), names)(
        endpoint, timeout, curve_server_key, curve_client_key)
    rows = ([[round(float(x), 6) for x in row] for row in result.embeddings] if encoding == "float32"
            else result.embeddings.tolist())
    click.echo(json.dumps({"model": result.model, "fingerprint": result.fingerprint, "dimension": result.dimension,
                           "encoding": encoding, "tokens": result.tokens, "embeddings": rows}))


@cli.command()
@click.argument("query")
@click.argument("documents", nargs=-1, required=True)
@click.option("--instruction", default=None, help="Task instruction (default: the official retrieval one).")
@click.option("--top-n", type=click.IntRange(min=1), default=None, help="Also list the N best documents' indices.")
@click.option("--expect-fingerprint", default=None,
              help="Refuse unless the model has this fingerprint (health); without --model, the model that has it.")
@click.option("--model", default=None, help="The daemon's reranker of this name (health lists them).")
@PRIORITY_OPTION
@_client_options
def rerank(query, documents, instruction, top_n, expect_fingerprint, model, priority, endpoint, timeout,
           curve_server_key, curve_client_key) -> None:
    """Score DOCUMENTS against QUERY; prints JSON."""
    result = _run_client(lambda c: c.rerank(query, list(documents), instruction, top_n=top_n,
                                            expect_fingerprint=expect_fingerprint, model=model,
                                            priority=priority))(
        endpoint, timeout, curve_server_key, curve_client_key)
    body = {"model": result.model, "fingerprint": result.fingerprint, "tokens": result.tokens, "scores": result.scores}
    click.echo(json.dumps(body if result.top is None else {**body, "top": result.top}))


@cli.command()
@click.option("--ready", "probe", flag_value="ready", default=None,
              help="A readiness probe: exit 0 only if the daemon is ready (its models loaded and warm, not "
                   "draining), else 1; print its status. --timeout defaults to 1 s.")
@click.option("--live", "probe", flag_value="live",
              help="A liveness probe: exit 0 if the socket loop answers at all (loading, busy or draining), "
                   "else 1. --timeout defaults to 1 s.")
@_client_options
def health(probe, endpoint, timeout, curve_server_key, curve_client_key) -> None:
    """Print the daemon's health as JSON (with several endpoints: the one that answered), or, with
    --ready or --live, answer as a probe by the exit code."""
    if probe is None:
        click.echo(json.dumps(_run_client(lambda c: c.health())(endpoint, timeout, curve_server_key, curve_client_key)))
        return
    if click.get_current_context().get_parameter_source("timeout") is ParameterSource.DEFAULT:
        timeout = PROBE_TIMEOUT_S
    health = _run_client(lambda c: c.health())(endpoint, timeout, curve_server_key, curve_client_key)
    ok, line = probe_verdict(probe, health)
    click.echo(line)
    sys.exit(0 if ok else 1)


PROBE_TIMEOUT_S = 1.0  # a probe's whole wait: the socket loop answers health at once, even mid-batch


def probe_verdict(probe: str, health: dict) -> tuple[bool, str]:
    """Whether a probe passes on this health reply, and the line it prints (kubelet keeps it on failure).
    Live: any answer. Ready: status `ready` (set once every model loaded at start is warm; never while
    draining); in --load on-demand a ready daemon may still load a model for its first request."""
    status = str(health.get("status"))
    models = ", ".join(f"{m.get('name')} {m.get('state')}" for m in health.get("models") or [])
    line = f"{status}" + (f" ({models})" if models else "")
    return (True if probe == "live" else status == "ready"), line


@cli.command()
@click.argument("sample", type=FILE)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Calibration file to write (pass it to `serve --int8-calibration`).")
@click.option("--dimension", "dimensions", multiple=True, type=click.IntRange(min=1),
              help="Output dimension to calibrate (repeatable; default: the full size, the daemon's default "
                   "and the powers of two from 32).")
@click.option("--instruction", default=None, help="The instruction the inputs are embedded with.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Inputs per request.")
@_client_options
def calibrate(sample, out, dimensions, instruction, batch, endpoint, timeout, curve_server_key,
              curve_client_key) -> None:
    """int8/uint8 ranges from SAMPLE, one input per line (a text, or a JSON input object), embedded by
    the running daemon; prints a summary as JSON."""
    from daemon.outputs.calibrate import RECOMMENDED_SAMPLES, calibrate as run, read_sample

    try:
        found = read_sample(sample)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if len(found.inputs) < RECOMMENDED_SAMPLES:
        click.echo(f"qwen3vl-daemon: note: {len(found.inputs)} inputs; ranges from fewer than "
                   f"{RECOMMENDED_SAMPLES} may clip values the sample did not show", err=True)

    def call(client):
        try:
            return run(client, found, list(dimensions) or None, instruction, batch)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None

    result = _run_client(call)(endpoint, timeout, curve_server_key, curve_client_key)
    result.save(out)
    click.echo(json.dumps({"out": str(out), "fingerprint": result.fingerprint, "samples": result.samples,
                           "dimensions": sorted(result.ranges), "id": result.id}))


# -- embed-dataset ---------------------------------------------------------------------------------
# `serve`'s options that make no sense for a job: how it serves, and the reranker. The rest set the
# in-process models of --ray as they set the daemon's.
SERVING_ONLY = frozenset({
    "endpoint", "reranker_models", "reranker_quantize", "reranker_max_length", "keep_alive", "load_mode",
    "embedding_dim", "max_queued_inputs", "max_queued_tokens", "socket_mode", "curve_secret_key",
    "curve_authorized_keys", "drain_timeout", "metrics_address", "log_level", "log_stream"})


def _model_options(fn):
    import copy

    fn.__click_params__ = getattr(fn, "__click_params__", [])
    for param in serve.params:
        if param.name not in SERVING_ONLY:
            fn.__click_params__.append(copy.copy(param))
    return fn


def _ray_config(opts: dict) -> DaemonConfig:
    """The in-process models' configuration: `serve`'s, from the options given, without a reranker."""
    given = {p.name: (p.default() if callable(p.default) else p.default) for p in serve.params}
    given.update({k: v for k, v in opts.items() if k in given})
    given["reranker_models"] = ("none",)
    config = config_from_options(given)
    if config.embedding is None:
        raise click.BadParameter("--ray needs an embedding model", param_hint="--embedding-model")
    return config


@cli.command("embed-dataset")
@click.argument("input_path", metavar="INPUT", type=FILE)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The Parquet dataset to write (created; resumed when it exists).")
@click.option("--id-column", default="id", show_default=True, help="INPUT's id column.")
@click.option("--text-column", default="text", show_default=True, help="INPUT's text column.")
@click.option("--image-column", default="image", show_default=True, help="INPUT's image column (bytes, path or URL).")
@click.option("--video-column", default="video", show_default=True, help="INPUT's video column.")
@click.option("--input-column", default="input", show_default=True,
              help="INPUT's column of whole input objects (used instead of the others where set).")
@click.option("--instruction", default=None, help="Task instruction (default: \"Represent the user's input.\").")
@click.option("--dimension", type=click.IntRange(min=1), default=None, help="Output dimension (Matryoshka).")
@click.option("--encoding", type=click.Choice(["float32", "int8", "uint8", "binary", "ubinary"]), default="float32",
              show_default=True, help="Vector type: float32 lists, or fixed-size binary for the compact types.")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="Unit-length vectors.")
@click.option("--model", default=None, help="The daemon's embedding model of this name; default: its default.")
@click.option("--commit-rows", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Rows per commit (a part file); also committed every --commit-seconds.")
@click.option("--commit-seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Longest time between commits.")
@click.option("--batch-rows", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rows per request (per actor call with --ray).")
@click.option("--batch-bytes", type=click.IntRange(min=1024), default=8 << 20, show_default=True,
              help="Bytes of inputs per request at most (local mode; also kept under the daemon's "
                   "--max-message-bytes): a larger row goes alone, one the daemon cannot take is that row's "
                   "too_large error.")
@click.option("--in-flight", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests in flight per daemon (local mode).")
@click.option("--retry-seconds", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="How long a batch is retried while the daemons are busy, restarting or away.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace what --out holds instead of resuming it.")
@click.option("--retry-errors", is_flag=True, default=False,
              help="Embed again the rows errors.jsonl holds (a resume skips them otherwise).")
@click.option("--ray", "ray_address", default=None, metavar="local|auto|ADDRESS",
              help="Run as a Ray Data pipeline with the models in its actors: local (a Ray of this machine's "
                   "own), auto (the cluster this machine is in) or a cluster's address.")
@click.option("--ray-actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray on CPUs: how many actors (on GPUs: one per GPU).")
@click.option("--ray-actor-cpus", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="With --ray on CPUs: the CPUs each actor takes.")
@_client_options
@_model_options
def embed_dataset(input_path, out, id_column, text_column, image_column, video_column, input_column, instruction,
                  dimension, encoding, normalize, model, commit_rows, commit_seconds, batch_rows, batch_bytes,
                  in_flight, retry_seconds, overwrite, retry_errors, ray_address, ray_actors, ray_actor_cpus, endpoint, timeout,
                  curve_server_key, curve_client_key, **model_opts) -> None:
    """Embed every row of INPUT (JSONL or Parquet: an id and text, image, video or a whole input)
    into the Parquet dataset --out, resumably: run it again to finish after a stop or a crash.

    Local mode (the default) sends the rows to the daemons at --endpoint; --ray runs the models in
    Ray actors, with serve's model options (--embedding-model, --device, --dtype, ...). Rows that
    fail go to OUT/errors.jsonl. Prints a JSON summary."""
    from daemon.dataset.batches import EmbedSettings
    from daemon.dataset.job import JobSpec

    ctx = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in model_opts
             if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if ray_address is None and given:
        raise click.UsageError(f"{', '.join(given)}: model options apply with --ray (local mode uses the daemons' "
                               "models)")
    if encoding in ("binary", "ubinary") and dimension is not None and dimension % 8:
        raise click.BadParameter("binary encodings need a multiple of 8", param_hint="--dimension")
    from daemon.dataset.rows import Columns

    spec = JobSpec(input=input_path, out=out,
                   columns=Columns(id_column, text_column, image_column, video_column, input_column),
                   embed=EmbedSettings(instruction, dimension, normalize, encoding, model=model),
                   commit_rows=commit_rows, commit_seconds=commit_seconds, batch_rows=batch_rows, batch_bytes=batch_bytes,
                   in_flight=in_flight, overwrite=overwrite, retry_errors=retry_errors, retry_s=retry_seconds)
    if ray_address is None:
        run = _local_runner(spec, endpoint, timeout, curve_server_key, curve_client_key)
    else:
        run = _ray_runner(spec, ray_address, _ray_config(model_opts), ray_actors, ray_actor_cpus)
    _finish_dataset_job(run, input_path)


def _local_runner(spec, endpoint, timeout, curve_server_key, curve_client_key):
    from daemon.dataset.job import run_local

    curve = CurveKeys.from_files(curve_server_key, curve_client_key) if curve_server_key else None
    logging.getLogger("qwen3vl.discovery").addHandler(logging.NullHandler())
    try:
        Client(endpoint, timeout=timeout, curve=curve).close()  # a malformed endpoint fails here, in one line
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--endpoint") from None
    return lambda stop: run_local(spec, lambda: Client(endpoint, timeout=timeout, curve=curve), stop)


def _ray_runner(spec, address, config, actors, actor_cpus):
    from daemon.dataset.ray_job import RayPlan, run_ray

    return lambda stop: run_ray(spec, RayPlan(address, config, actors, actor_cpus), stop)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _finish_dataset_job(run, input_path) -> None:
    """Run the job with SIGINT/SIGTERM stopping it cleanly (what is done is committed); one line on
    failure, the summary on success."""
    import signal
    import threading

    from daemon.dataset.batches import JobFailed
    from daemon.dataset.rows import InputError
    from daemon.dataset.store import StoreError

    stop, interrupted = threading.Event(), threading.Event()  # `stop` is also set by a failure

    def on_signal(*_) -> None:
        interrupted.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        summary = run(stop)
    except (JobFailed, StoreError, InputError, DaemonError, DaemonTimeout, DaemonUnavailable) as exc:
        click.echo(f"qwen3vl-daemon: {exc}", err=True)
        sys.exit(130 if interrupted.is_set() else 1)
    except OSError as exc:  # the disk full, OUT read-only: the job resumes once fixed
        where, why = (exc.filename, exc.strerror) if exc.filename else (input_path, f"cannot be read: {exc}")
        click.echo(f"qwen3vl-daemon: {where}: {_one_line(why)}", err=True)
        sys.exit(130 if interrupted.is_set() else 1)
    except Exception as exc:
        if not type(exc).__module__.startswith("pyarrow"):
            raise
        # A truncated or corrupt Parquet file, or one nested past what pyarrow reads.
        click.echo(f"qwen3vl-daemon: {input_path}: cannot be read: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    click.echo(summary.line(), err=True)
    click.echo(json.dumps(summary.to_json()))


show_envvars(embed_dataset)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
