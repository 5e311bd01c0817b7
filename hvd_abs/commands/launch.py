"""`hvd-abs launch horovod|ray`."""
from __future__ import annotations

import click


@click.group("launch")
def command() -> None:
    """Launch elastic training through horovodrun or on a Ray cluster."""


@command.command("horovod")
def horovod() -> None:
    """Build, print and run the elastic horovodrun command for `hvd-abs train`."""
    raise click.UsageError("`hvd-abs launch horovod` is not implemented yet")


@command.command("ray")
def ray() -> None:
    """Run elastic training with Ray actors as Horovod workers."""
    raise click.UsageError("`hvd-abs launch ray` is not implemented yet")
