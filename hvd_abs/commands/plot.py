"""`hvd-abs plot`."""
from __future__ import annotations

import click


@click.command("plot")
def command() -> None:
    """Not implemented yet."""
    raise click.UsageError("`hvd-abs plot` is not implemented yet")
