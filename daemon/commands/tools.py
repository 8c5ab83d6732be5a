"""`tiny-checkpoint` (a random-weight checkpoint for tests) and `keygen` (CURVE key pairs)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from daemon.logs import quiet_libraries


@click.command("tiny-checkpoint")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def tiny_checkpoint(directory: Path) -> None:
    """Write a tiny random-weight Qwen3-VL checkpoint to DIRECTORY (offline; for tests, not for use)."""
    from daemon.loading.tiny import build_tiny_checkpoint

    quiet_libraries()
    click.echo(str(build_tiny_checkpoint(directory)))


@click.command()
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
