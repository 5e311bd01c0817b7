"""Turn a UserError into one line on stderr and exit code 2, with no traceback."""
from __future__ import annotations

import functools
from typing import Any, Callable

import click


def user_errors_exit_2(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for command bodies: `hvd_abs.errors.UserError` -> "Error: <message>", exit 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hvd_abs.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"Error: {' '.join(str(exc).split())}", err=True)
            raise SystemExit(2) from None

    return wrapper
