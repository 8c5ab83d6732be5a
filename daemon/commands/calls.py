"""The client commands: `embed`, `rerank`, `health` (also as a readiness or liveness probe) and
`calibrate`, each one request (or a few) to a running daemon through the Python client; and the
options and error handling every client command shares."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from qwen3vl_client.client import Client, CurveKeys, DaemonError, DaemonTimeout, DaemonUnavailable, DEFAULT_TIMEOUT_S
from qwen3vl_client.endpoints import client_endpoint
from qwen3vl_client.fields import INTERACTIVE, PRIORITIES
from qwen3vl_client.protocol import as_lists


def client_options(fn):
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


def run_client(call, names: dict[str, str] | None = None):
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


@click.command()
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
@client_options
def embed(texts, images, videos, frames, separate, instruction, dimension, encoding, expect_fingerprint, model,
          priority, endpoint, timeout, curve_server_key, curve_client_key) -> None:
    """Embed TEXTS and media; prints JSON.

    Texts alone are one input each. With --image, --video or --frame, the texts and media make one
    input (one vector), unless --separate."""
    if not (texts or images or videos or frames):
        raise click.UsageError("give at least one text, --image, --video or --frame")
    inputs, names = embed_inputs(texts, images, videos, frames, separate)
    result = run_client(lambda c: c.embed(inputs, instruction, dimension, encoding=encoding,
                                           expect_fingerprint=expect_fingerprint, model=model,
                                           priority=priority), names)(
        endpoint, timeout, curve_server_key, curve_client_key)
    rows = ([[round(float(x), 6) for x in row] for row in result.embeddings] if encoding == "float32"
            else as_lists(result.embeddings))
    click.echo(json.dumps({"model": result.model, "fingerprint": result.fingerprint, "dimension": result.dimension,
                           "encoding": encoding, "tokens": result.tokens, "embeddings": rows}))


@click.command()
@click.argument("query")
@click.argument("documents", nargs=-1, required=True)
@click.option("--instruction", default=None, help="Task instruction (default: the official retrieval one).")
@click.option("--top-n", type=click.IntRange(min=1), default=None, help="Also list the N best documents' indices.")
@click.option("--expect-fingerprint", default=None,
              help="Refuse unless the model has this fingerprint (health); without --model, the model that has it.")
@click.option("--model", default=None, help="The daemon's reranker of this name (health lists them).")
@PRIORITY_OPTION
@client_options
def rerank(query, documents, instruction, top_n, expect_fingerprint, model, priority, endpoint, timeout,
           curve_server_key, curve_client_key) -> None:
    """Score DOCUMENTS against QUERY; prints JSON."""
    result = run_client(lambda c: c.rerank(query, list(documents), instruction, top_n=top_n,
                                            expect_fingerprint=expect_fingerprint, model=model,
                                            priority=priority))(
        endpoint, timeout, curve_server_key, curve_client_key)
    body = {"model": result.model, "fingerprint": result.fingerprint, "tokens": result.tokens, "scores": result.scores}
    click.echo(json.dumps(body if result.top is None else {**body, "top": result.top}))


@click.command()
@click.option("--ready", "probe", flag_value="ready", default=None,
              help="A readiness probe: exit 0 only if the daemon is ready (its models loaded and warm, not "
                   "draining), else 1; print its status. --timeout defaults to 1 s.")
@click.option("--live", "probe", flag_value="live",
              help="A liveness probe: exit 0 if the socket loop answers at all (loading, busy or draining), "
                   "else 1. --timeout defaults to 1 s.")
@client_options
def health(probe, endpoint, timeout, curve_server_key, curve_client_key) -> None:
    """Print the daemon's health as JSON (with several endpoints: the one that answered), or, with
    --ready or --live, answer as a probe by the exit code."""
    if probe is None:
        click.echo(json.dumps(run_client(lambda c: c.health())(endpoint, timeout, curve_server_key, curve_client_key)))
        return
    if click.get_current_context().get_parameter_source("timeout") is ParameterSource.DEFAULT:
        timeout = PROBE_TIMEOUT_S
    health = run_client(lambda c: c.health())(endpoint, timeout, curve_server_key, curve_client_key)
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


@click.command()
@click.argument("sample", type=FILE)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Calibration file to write (pass it to `serve --int8-calibration`).")
@click.option("--dimension", "dimensions", multiple=True, type=click.IntRange(min=1),
              help="Output dimension to calibrate (repeatable; default: the full size, the daemon's default "
                   "and the powers of two from 32).")
@click.option("--instruction", default=None, help="The instruction the inputs are embedded with.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Inputs per request.")
@client_options
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

    result = run_client(call)(endpoint, timeout, curve_server_key, curve_client_key)
    result.save(out)
    click.echo(json.dumps({"out": str(out), "fingerprint": result.fingerprint, "samples": result.samples,
                           "dimensions": sorted(result.ranges), "id": result.id}))
