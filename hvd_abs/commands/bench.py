"""`hvd-abs bench`."""
from __future__ import annotations

import click


@click.command("bench")
def command() -> None:
    """Not implemented yet."""
    raise click.UsageError("`hvd-abs bench` is not implemented yet")
