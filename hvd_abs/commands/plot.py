"""`hvd-abs plot`: redraw a run's plots.png from its metrics.jsonl."""
from __future__ import annotations

import click

from hvd_abs.errors import user_errors_exit_2


@click.command("plot")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", default=None, help="Image path (default: RUN_DIR/plots.png).")
@user_errors_exit_2
def command(run_dir: str, out: str | None) -> None:
    """Draw batch size, top eigenvalue, LR and accuracy against parameter updates for RUN_DIR."""
    from pathlib import Path

    from hvd_abs.errors import UserError
    from hvd_abs.metrics import METRICS_FILE
    from hvd_abs.plotting import plot_run

    if not (Path(run_dir) / METRICS_FILE).is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}: pass the --out directory of a `hvd-abs train` run")
    click.echo(str(plot_run(run_dir, out)))
