"""The command line's entry point: the `qwen3vl-daemon` group, made of the commands in daemon/commands/
(`serve`, `embed`, `rerank`, `health`, `calibrate`, `embed-dataset`, `tiny-checkpoint`, `keygen`)."""

from __future__ import annotations

import click

from daemon import __version__
from daemon.commands.calls import calibrate, embed, health, rerank
from daemon.commands.dataset import embed_dataset
from daemon.commands.serve import serve
from daemon.commands.tools import keygen, tiny_checkpoint


@click.group()
@click.version_option(__version__)
def cli() -> None:
    """Qwen3-VL embedding and reranking daemon."""


for command in (serve, embed, rerank, health, calibrate, embed_dataset, tiny_checkpoint, keygen):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
