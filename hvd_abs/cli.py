"""The `hvd-abs` command line (also `python -m hvd_abs`): a click group, one subcommand per job.

Each subcommand lives in hvd_abs/commands/ and imports its machinery (torch, Horovod, Ray) inside
its body, so `hvd-abs --help` stays fast and needs neither Horovod nor Ray.
"""
from __future__ import annotations

import click

from hvd_abs import __version__
from hvd_abs.commands import bench, env, hessian, launch, plot, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvd-abs")
def main() -> None:
    """Elastic adaptive-batch-size (ABS/ABSA) training of PyTorch models on Horovod."""


for _module in (train, launch, hessian, bench, env, plot):
    main.add_command(_module.command)
