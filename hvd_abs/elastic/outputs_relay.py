"""The worker's end of relayed outputs: in a job whose launcher set up a job channel, rank 0 (on
whichever host it is now) sends the run's metrics lines, summary, checkpoints and final files to
the launcher, which writes them into OUT on its own host (launch/job_service.py, with a
training.outputs.LocalOutputs). The launcher's writer outlives every rank 0 of the job, so a line
a new rank 0 sends again after a rollback is written once, as in one file on one host. Workers
keep only scratch: --resume's newest checkpoint is fetched from the launcher into a temp folder.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from hvd_abs.elastic.job_channel import ADDRESS_ENV, ChannelError, JobChannel
from hvd_abs.errors import UserError
from hvd_abs.metrics import MetricsWriter
from hvd_abs.training.run_dir import CHECKPOINT_DIR, RESUME_COPY_ENV


def _ask(channel: JobChannel, op: str, payload: bytes = b"", **fields: Any) -> dict[str, Any]:
    try:
        return channel.request(op, payload, **fields)
    except ChannelError as exc:  # the launcher is gone or refused: this run cannot keep its outputs
        raise UserError(f"the run's outputs cannot reach the launcher's host ({op}): {exc}") from None


class RelayWriter(MetricsWriter):
    """Rank 0's metrics writer: each line to the launcher's writer, which drops lines it has."""

    def __init__(self, channel: JobChannel) -> None:
        super().__init__(".", enabled=False)
        self.channel = channel

    def _write(self, record: dict[str, Any]) -> None:
        _ask(self.channel, "metrics", json.dumps(record).encode())

    def summary(self, **fields: Any) -> None:
        _ask(self.channel, "summary", json.dumps(fields).encode())


class RelayOutputs:
    """training.outputs.LocalOutputs' calls, carried out on the launcher's host."""

    def __init__(self, channel: JobChannel, loggers: Sequence[str] = ()) -> None:
        self.channel = channel
        self.loggers = list(loggers)

    def prepare(self, overwrite: bool, resumed_at: tuple[int, int] | None, config: str | None = None) -> None:
        # (the launcher prepares once per job: a later rank 0 asking again changes nothing)
        _ask(self.channel, "prepare", (config or "").encode(), overwrite=bool(overwrite),
             resumed_at=list(resumed_at) if resumed_at else None, loggers=self.loggers, config=config is not None)

    def writer(self, rank: int, in_place: bool) -> MetricsWriter:
        return RelayWriter(self.channel) if rank == 0 else MetricsWriter(".", enabled=False)

    def save_checkpoint(self, state: dict[str, Any], updates: int, keep: int) -> str:
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        return _ask(self.channel, "checkpoint", buf.getvalue(), updates=updates, keep=keep)["path"]

    def finish(self, weights: bytes, summary: dict[str, Any], plot: bool, writer: MetricsWriter) -> dict[str, Any]:
        _ask(self.channel, "weights", weights)
        done = _ask(self.channel, "finish", json.dumps(summary).encode(), plot=bool(plot))
        return {**summary, **done["added"]}


def launcher_prints_summary(elastic: bool) -> bool:
    """Whether the launcher prints the run's final table (from OUT, on its host, where the
    metrics are), so rank 0 must not: an elastic worker of a job with a job channel."""
    return bool(elastic) and bool(os.environ.get(ADDRESS_ENV))


def fetch_resume(options: dict[str, Any]) -> None:
    """Before an elastic worker reads --resume DIR (the launcher's): the newest checkpoint there
    that verifies, copied into a temp folder that run_dir.checkpoints_of then reads for DIR."""
    resume = options.get("resume")
    channel = JobChannel.from_env() if options.get("elastic") and resume else None
    if channel is None:
        return
    from hvd_abs.training.checkpoint import save_payload, updates_of  # (imports torch)

    answer = _ask(channel, "resume_checkpoint", run_dir=str(resume))
    scratch = Path(tempfile.mkdtemp(prefix="hvd_abs-resume-"))
    atexit.register(shutil.rmtree, scratch, True)
    save_payload(scratch / CHECKPOINT_DIR, answer["payload"], updates_of(answer["name"]), keep=1)
    os.environ[RESUME_COPY_ENV] = json.dumps({"run_dir": str(Path(resume).expanduser().resolve()),
                                              "copy": str(scratch)})
