"""`embed-dataset`: embed every row of a JSONL or Parquet file into a Parquet dataset, through running
daemons or, with --ray, in-process models on a Ray cluster (daemon/dataset/ is the job itself)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from daemon.commands.calls import FILE, client_options
from daemon.commands.serve import config_from_options, serve
from daemon.config import DaemonConfig, show_envvars
from qwen3vl_client.client import Client, CurveKeys, DaemonError, DaemonTimeout, DaemonUnavailable


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


@click.command("embed-dataset")
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
@client_options
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
