"""The run directory's lock, held by a launcher while its job runs (its workers come and go)."""
from __future__ import annotations

import contextlib

import click


def locked(run_dir: str) -> contextlib.ExitStack:
    """The run dir's lock (hvd_abs/locks.py), taken now and released when the returned stack
    closes: a usage error if another run holds it."""
    from hvd_abs.errors import UserError
    from hvd_abs.locks import run_lock

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(run_lock(run_dir))
    except UserError as exc:
        raise click.UsageError(str(exc)) from None
    return stack
