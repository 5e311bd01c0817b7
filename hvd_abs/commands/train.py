"""`hvd-abs train`."""
from __future__ import annotations

import click


@click.command("train")
def command() -> None:
    """Not implemented yet."""
    raise click.UsageError("`hvd-abs train` is not implemented yet")
