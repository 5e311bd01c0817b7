"""Turn a UserError into one line on stderr and exit code 2, with no traceback."""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

# The message of the last refusal in this process (exit_2), for a caller that runs commands or
# scripts in-process and must say why one stopped: the Ray executor's script workers.
last_refusal: str | None = None


def exit_2(message: str) -> None:
    """Print "Error: <message>" (on one line) to stderr and exit with code 2."""
    global last_refusal
    last_refusal = " ".join(str(message).split())
    click.echo(f"Error: {last_refusal}", err=True)
    raise SystemExit(2)


def user_errors_exit_2(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for command bodies and scripts' main functions: `hvd_abs.errors.UserError` ->
    "Error: <message>", exit 2; Ctrl-C -> "Aborted!", exit 130 (as a shell reports SIGINT), not
    a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hvd_abs.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            exit_2(str(exc))
        except KeyboardInterrupt:
            click.echo("Aborted!", err=True)
            raise SystemExit(130) from None

    return wrapper
