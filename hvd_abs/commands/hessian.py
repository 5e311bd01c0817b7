"""`hvd-abs hessian`."""
from __future__ import annotations

import click


@click.command("hessian")
def command() -> None:
    """TODO"""
    raise click.UsageError("`hvd-abs hessian` is not implemented yet")
