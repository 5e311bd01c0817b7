"""The outcome of a launched elastic job that looked failed: whether the run finished anyway
(finished_epochs), the exit code and line to print (job_outcome), and where horovodrun's
traceback goes (keep_report, report_failure)."""
from __future__ import annotations

import click

FAILURE_REPORT = "horovodrun-error.txt"  # in OUT/elastic/: horovodrun's traceback after a finished run


def finished_epochs(train_args: list[str], started: float) -> int | None:
    """The epoch count of the run in --out when this launch (begun at time `started`) finished
    it, else None. Finished: summary.json holds this run's final summary (the one
    hvd_abs.training.session.finish writes, with "metrics", after the final checkpoint), written since
    `started` (not a summary an earlier run left), for all the --epochs this launch planned."""
    import json
    import os
    from pathlib import Path

    from hvd_abs.training.options import config_from_options, train_context
    from hvd_abs.errors import UserError
    from hvd_abs.launch.horovod import option_value
    from hvd_abs.metrics import SUMMARY_FILE

    out = option_value(train_args, "--out")
    if not out:
        return None
    path = Path(out).expanduser() / SUMMARY_FILE
    try:
        ctx = train_context(list(train_args), extras=True, resilient=True)
        planned = config_from_options(dict(ctx.params), ctx).epochs  # (a resume's: the run's own unless given)
        if os.stat(path).st_mtime < started - 1.0:  # (1 s: coarse file-system clocks)
            return None
        summary = json.loads(path.read_text())
    except (OSError, ValueError, KeyError, TypeError, click.ClickException, UserError):
        return None
    epochs = summary.get("epochs") if isinstance(summary, dict) else None
    if not isinstance(planned, int) or not isinstance(epochs, int) or "metrics" not in summary or epochs < planned:
        return None
    return epochs


def job_outcome(train_args: list[str], why: str, started: float, report: str | None = None) -> tuple[int, str]:
    """After a launcher saw the job fail (`why`, e.g. "horovodrun exited 1"): (exit code, the line
    to print). A run that finished anyway (`finished_epochs`; e.g. a worker's wrapper process
    died while its Python process went on) is exit 0 and a warning naming its results: nothing
    was lost, and a rerun or --resume would have nothing to do (--resume refuses a finished run).
    `report`: where horovodrun's traceback was kept. Else exit 1 and how to go on: --resume
    from a checkpoint when there is one, else a rerun (with --overwrite when the failed run left
    files that would make a plain rerun be refused)."""
    from pathlib import Path

    from hvd_abs.training.checkpoint import list_checkpoints
    from hvd_abs.launch.horovod import option_value
    from hvd_abs.training.run_dir import CHECKPOINT_DIR, RUN_FILES

    out = option_value(train_args, "--out")
    epochs = finished_epochs(train_args, started)
    if epochs is not None:
        kept = f" (its traceback: {report})" if report else ""
        return 0, (f"Warning: the run finished all {epochs} epochs; its results are in {out} (summary.json, "
                   f"metrics.jsonl, {CHECKPOINT_DIR}/), but {why}: a worker process failed while or after the job "
                   f"ran{kept}; nothing needs rerunning")
    run_dir = Path(out).expanduser() if out else None
    if run_dir is not None and list_checkpoints(run_dir / CHECKPOINT_DIR):
        hint = f"continue from its newest good checkpoint: rerun with --resume {out} among the train options"
    elif run_dir is not None and "--overwrite" not in train_args and any((run_dir / f).exists() for f in RUN_FILES):
        hint = ("it left no checkpoint (pass --checkpoint-every N to keep some); rerun it with --overwrite among "
                "the train options")
    else:
        hint = "it left no checkpoint (pass --checkpoint-every N to keep some); rerun it"
    return 1, f"Error: the elastic job failed ({why}); {hint}"


def keep_report(train_args: list[str], traceback: str) -> str | None:
    """Keep horovodrun's traceback in OUT/elastic/FAILURE_REPORT instead of printing it; returns
    the file's path, or None when it could not be written."""
    from pathlib import Path

    from hvd_abs.launch.horovod import option_value

    if not traceback:
        return None
    path = Path(option_value(train_args, "--out")).expanduser() / "elastic" / FAILURE_REPORT
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback)
        return str(path)
    except OSError:
        return None


def report_failure(train_args: list[str], why: str, started: float, traceback: str = "") -> int:
    """Print the outcome of a failed-looking job (job_outcome) and return the exit code. A run that
    finished keeps horovodrun's traceback in OUT/elastic/FAILURE_REPORT instead of printing it."""
    import sys

    report = None
    if traceback and finished_epochs(train_args, started) is not None:
        report = keep_report(train_args, traceback)
        if report is not None:
            traceback = ""  # (else printed below instead)
    if traceback:
        sys.stderr.write(traceback)
        sys.stderr.flush()
    code, line = job_outcome(train_args, why, started, report)
    click.echo(line, err=True)
    return code
