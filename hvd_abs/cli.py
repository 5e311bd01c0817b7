"""The `hvd-abs` command line (also `python -m hvd_abs`): a click group, one subcommand per job.

Each subcommand lives in hvd_abs/commands/ and imports its machinery (torch, Horovod, Ray) inside
its body, so `hvd-abs --help` stays fast and needs neither Horovod nor Ray.

Bad input, whether click's own usage errors or `hvd_abs.errors.UserError` (see
hvd_abs/errors.py), ends in ONE line on stderr, `Error: <what to fix>`, and exit code 2.
"""
from __future__ import annotations

import sys
from typing import Any

import click

from hvd_abs import __version__
from hvd_abs.errors import run_command
from hvd_abs.commands import bench, env, hessian, launch, plot, train


class OneLineErrors(click.Group):
    """A click group whose usage errors print one line (no usage block) and exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        sys.exit(run_command(super(), args, prog_name, complete_var=complete_var, **extra))


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvd-abs")
def main() -> None:
    """Elastic adaptive-batch-size (ABS/ABSA) training of PyTorch models on Horovod."""


for _module in (train, launch, hessian, bench, env, plot):
    main.add_command(_module.command)
