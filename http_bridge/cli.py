"""`qwen3vl-bridge`: serve the HTTP bridge in front of a running daemon."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

import click
import uvicorn

from qwen3vl_client.client import CurveKeys
from qwen3vl_client.endpoints import client_endpoint

from .bridge import BridgeConfig, create_app
from .guard import header_timeout_protocol


def read_token(token_file: str | None, env_token: str | None) -> str | None:
    """The bearer token: the file's content, else $QWEN3VL_BRIDGE_TOKEN, else none. An empty or blank
    one is refused: it would silently turn authentication off."""
    if token_file:
        token = Path(token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"the token file {token_file} is empty or blank: write a token into it "
                             "(e.g. `openssl rand -hex 32`), or drop --token-file")
        return token
    if env_token:
        if not env_token.strip():
            raise ValueError("QWEN3VL_BRIDGE_TOKEN is blank: set a token, or unset it")
        return env_token.strip()
    return None


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, allow_no_token: bool) -> None:
    """A bridge reachable from other hosts must ask for a token, unless the operator says otherwise."""
    if token is None and not is_loopback_host(host) and not allow_no_token:
        raise ValueError(f"--host {host} is reachable from other hosts and no token is set: give --token-file "
                         "(or QWEN3VL_BRIDGE_TOKEN), or pass --allow-no-token to serve it unauthenticated")


@click.command()
@click.option("--endpoint", envvar="QWEN3VL_ENDPOINT", default=client_endpoint,
              help="The daemon's endpoint; several, comma-separated, spread the requests and fail over; "
                   "dns+tcp://HOST:PORT: every address of HOST (a headless Service), looked up again every "
                   "$QWEN3VL_DNS_REFRESH s.")
@click.option("--curve-server-key", envvar="QWEN3VL_CURVE_SERVER_KEY", default=None,
              type=click.Path(exists=True, dir_okay=False), help="The daemon's public key file (CURVE).")
@click.option("--curve-client-key", envvar="QWEN3VL_CURVE_CLIENT_KEY", default=None,
              type=click.Path(exists=True, dir_okay=False), help="The bridge's secret key file (CURVE).")
@click.option("--host", envvar="QWEN3VL_BRIDGE_HOST", default=BridgeConfig.host, show_default=True)
@click.option("--port", envvar=["PORT", "QWEN3VL_BRIDGE_PORT"], type=int, default=BridgeConfig.port, show_default=True)
@click.option("--token-file", envvar="QWEN3VL_BRIDGE_TOKEN_FILE", type=click.Path(exists=True, dir_okay=False),
              default=None, help="File holding the bearer token clients must send (none: no token).")
@click.option("--max-body-bytes", envvar="QWEN3VL_BRIDGE_MAX_BODY_BYTES", type=int,
              default=BridgeConfig.max_body_bytes, show_default=True)
@click.option("--timeout", envvar="QWEN3VL_BRIDGE_TIMEOUT", type=float, default=BridgeConfig.timeout_s,
              show_default=True,
              help="Seconds to wait for the daemon before answering 504.")
@click.option("--body-timeout", envvar="QWEN3VL_BRIDGE_BODY_TIMEOUT", type=click.FloatRange(min=0.1),
              default=BridgeConfig.body_timeout_s, show_default=True,
              help="Seconds for a request body to arrive, else 408.")
@click.option("--header-timeout", envvar="QWEN3VL_BRIDGE_HEADER_TIMEOUT", type=click.FloatRange(min=0.1),
              default=BridgeConfig.header_timeout_s, show_default=True,
              help="Seconds for a request's headers to arrive, else the connection is closed.")
@click.option("--limit-concurrency", envvar="QWEN3VL_BRIDGE_LIMIT_CONCURRENCY", type=click.IntRange(min=1),
              default=BridgeConfig.limit_concurrency, show_default=True,
              help="Open connections beyond which requests get 503 at once.")
@click.option("--allow-no-token", envvar="QWEN3VL_BRIDGE_ALLOW_NO_TOKEN", is_flag=True, default=False,
              help="Serve a non-loopback --host without a bearer token (refused otherwise).")
@click.option("--log-level", envvar="QWEN3VL_LOG_LEVEL", default="info", show_default=True,
              help="debug, info, warning or error.")
def main(endpoint, curve_server_key, curve_client_key, host, port, token_file, max_body_bytes, timeout, body_timeout,
         header_timeout, limit_concurrency, allow_no_token, log_level) -> None:
    """Serve the HTTP bridge in front of a running qwen3vl daemon."""
    try:
        token = read_token(token_file, os.environ.get("QWEN3VL_BRIDGE_TOKEN"))
        check_exposure(host, token, allow_no_token)
    except ValueError as exc:
        click.echo(f"qwen3vl-bridge: {exc}", err=True)
        sys.exit(1)
    curve = CurveKeys.from_files(curve_server_key, curve_client_key) if curve_server_key else None
    config = BridgeConfig(endpoint=endpoint, host=host, port=port, token=token, max_body_bytes=max_body_bytes,
                          timeout_s=timeout, body_timeout_s=body_timeout, header_timeout_s=header_timeout,
                          limit_concurrency=limit_concurrency, curve=curve)
    if token is None and not is_loopback_host(host):
        logging.getLogger("qwen3vl.bridge").warning("serving %s WITHOUT authentication (--allow-no-token)", host)
    try:
        app = create_app(config)
    except ValueError as exc:  # a malformed dns+tcp:// endpoint or QWEN3VL_DNS_REFRESH
        click.echo(f"qwen3vl-bridge: {exc}", err=True)
        sys.exit(1)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(),
                http=header_timeout_protocol(config.header_timeout_s), limit_concurrency=config.limit_concurrency)


for _param in main.params:  # --help names each option's environment variable
    _param.show_envvar = bool(getattr(_param, "envvar", None))
