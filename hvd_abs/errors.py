"""Bad input: `UserError` says what to fix; at a command's edge it becomes one line on stderr,
"Error: <what to fix>", and exit code 2, never a traceback."""
from __future__ import annotations

import functools
from typing import Any, Callable


class UserError(Exception):
    """Bad input that the user must fix; the CLI prints the message and exits 2.

    The message must say how to fix the input (which flag or path), not only what is wrong.
    """


class Refused(SystemExit):
    """The exit of a refused input: code 2, after its one line was said (`message`). A caller
    running commands or scripts in-process (the Ray executor's workers) tells a refusal by it."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def exit_2(message: str) -> None:
    """Print "Error: <message>" (on one line) to stderr and exit with code 2 (Refused)."""
    import click

    line = " ".join(str(message).split())
    click.echo(f"Error: {line}", err=True)
    raise Refused(line)


def user_errors_exit_2(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for command bodies and scripts' main functions: `UserError` -> "Error:
    <message>", exit 2; Ctrl-C -> "Aborted!", exit 130 (as a shell reports SIGINT)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            exit_2(str(exc))
        except KeyboardInterrupt:
            import click

            click.echo("Aborted!", err=True)
            raise SystemExit(130) from None

    return wrapper


def run_command(command: Any, args: Any = None, prog_name: str | None = None, **extra: Any) -> int:
    """Run a click command as a program: its usage errors in one line (no usage block), exit 2;
    returns the exit code (--help, --version: 0) instead of exiting."""
    import click

    try:
        code = command.main(args, prog_name, standalone_mode=False, **extra)
    except click.ClickException as exc:
        message = " ".join(exc.format_message().split())
        path = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx else None
        hint = f" (see `{path} --help`)" if path else ""
        click.echo(f"Error: {message}{hint}", err=True)
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return code if isinstance(code, int) else 0
