"""What runs in a worker: `hvd-abs train` (one process, a fixed Horovod world, or one worker of
an elastic job). `run_train(argv)` is the one entry the CLI, the warm standbys and the Ray
actors share; `train(cfg)` is the same from Python."""
from __future__ import annotations

import logging
from typing import Any

import click

from hvd_abs.elastic.outputs_relay import fetch_resume, launcher_prints_summary
from hvd_abs.errors import run_command, user_errors_exit_2
from hvd_abs.training.config import TrainConfig
from hvd_abs.training.config_file import to_yaml
from hvd_abs.training.options import config_from_options, train_command
from hvd_abs.training.progress import epoch_line, format_summary


def train(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """Run `cfg`: alone, under horovodrun, or as an elastic worker (cfg.elastic). kwargs: as for
    training.session.Session. Returns the summary (complete on rank 0)."""
    if cfg.elastic:
        from hvd_abs.elastic.job import ElasticSession

        return ElasticSession(cfg, **kwargs).run()
    from hvd_abs.training.session import Session

    return Session(cfg, **kwargs).run()


@user_errors_exit_2
def _train_body(**options: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fetch_resume(options)  # (a relayed job's --resume folder is on the launcher's host)
    cfg = config_from_options(options, click.get_current_context())
    if options.get("print_config"):
        cfg.validate()
        click.echo(to_yaml(cfg), nl=False)
        return
    on_epoch = None if cfg.quiet else (lambda r: click.echo(epoch_line(r), err=True))
    summary = train(cfg, on_epoch=on_epoch)
    # Ranks other than 0 print nothing; in a relayed job the launcher prints it, from its OUT.
    if summary is not None and "plot" in summary and not launcher_prints_summary(cfg.elastic):
        click.echo(format_summary(summary))


command = train_command(_train_body)


def run_train(argv: list[str]) -> int:
    """`hvd-abs train ARGV` in this process; returns its exit code (2: refused, said in one line)."""
    return run_command(command, list(argv), prog_name="hvd-abs train")
