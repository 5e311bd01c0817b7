"""One run end to end, the only one: `hvd-abs train`, `hvd_abs.fit`, the elastic worker
(elastic/job.py subclasses Session) and benchmarks/abs_study.py all run through `Session.run`.

    trainer = Trainer(cfg)                      (validates; loads data; builds the model)
    --resume: load the newest good checkpoint; refuse a run that already reached --epochs
    hold the out dir: lock it, check it again, clear it (--overwrite) or cut back its metrics
    fit() with the run's callbacks; a last checkpoint
    rank 0: model.pt, plots.png, summary.json (and the replaced run removed)

Nothing is written before the config, the data and the model were all accepted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from hvd_abs.errors import UserError
from hvd_abs.metrics import MetricsWriter
from hvd_abs.training.callbacks import run_callbacks
from hvd_abs.training.config import TrainConfig
from hvd_abs.training.config_file import to_yaml
from hvd_abs.training.events import Callback
from hvd_abs.training.outputs import LocalOutputs, weights_bytes
from hvd_abs.training.resume import refuse_finished
from hvd_abs.training.run_dir import CHECKPOINT_DIR, check_out_dir, new_run_dir, run_lock
from hvd_abs.training.trainer import EigenFn, Trainer


class Session:
    """A run of `cfg` (model, data: as for Trainer; on_epoch gets each epoch's line on rank 0;
    callbacks: more Callbacks, after the run's own). Subclasses change how the world is made and
    how fit runs (an elastic job: elastic/job.py)."""

    broadcast = True  # rank 0's state to all at the start (an elastic job syncs inside its loop)

    def __init__(self, cfg: TrainConfig, *, comm: Any = None, eigen_fn: EigenFn | None = None,
                 model: nn.Module | Callable[[], nn.Module] | None = None, data: Any = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None, plot: bool = True,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg, self.comm, self.eigen_fn, self.model, self.data = cfg, comm, eigen_fn, model, data
        self.on_epoch, self.plot, self.extra = on_epoch, plot, list(callbacks)
        self.out: Path | None = None if cfg.out is None else Path(cfg.out).expanduser()
        self.outputs: Any = None if cfg.out is None else self.make_outputs()
        self._writer: MetricsWriter | None = None
        self.trainer: Trainer | None = None

    # --- what a subclass changes ---------------------------------------------------------------
    def make_outputs(self) -> Any:
        return LocalOutputs(self.out, self.cfg.loggers)

    def make_comm(self) -> Any:
        from hvd_abs.comm import make_comm

        return make_comm("auto")

    @contextlib.contextmanager
    def hold_out_dir(self, resumed_at: tuple[int, int] | None) -> Iterator[None]:
        """While the run writes: rank 0 holds the lock, checks the folder again (a run may have
        finished there since validate() looked) and prepares it."""
        cfg, rank = self.cfg, self.comm.rank
        with run_lock(self.out) if rank == 0 else contextlib.nullcontext():  # (rank 0 alone writes there)
            if rank == 0:
                check_out_dir(self.out, cfg.overwrite or cfg.resumes_in_place, resuming=cfg.resume is not None)
                self.outputs.prepare(cfg.replaces_out, resumed_at, to_yaml(cfg))
            yield

    def writer(self) -> MetricsWriter:
        if self._writer is None:
            self._writer = self.outputs.writer(self.comm.rank, self.cfg.resumes_in_place)
        return self._writer

    def close_writers(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def job_callbacks(self) -> list[Callback]:
        return []

    def train(self, fit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return fit()

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.comm is None:
            self.comm = self.make_comm()
        if cfg.out is None and cfg.elastic:  # (each worker would pick its own folder)
            raise UserError("--elastic needs --out DIR, the job's folder (hvd-abs launch passes one)")
        if cfg.out is None:  # a new folder, rank 0's choice on every rank
            cfg.validate()  # (a refused run makes no folder)
            out = self.comm.broadcast_object(_new_run_dir_or_error() if self.comm.rank == 0 else None)
            if isinstance(out, UserError):  # (raised on every rank: none waits for the others)
                raise out
            self.cfg = cfg = dataclasses.replace(cfg, out=out)
            self.out = Path(out)
            self.outputs = self.make_outputs()
            if self.comm.rank == 0 and not cfg.quiet:
                print(f"run directory: {out}", file=sys.stderr, flush=True)
        trainer = self.trainer = Trainer(cfg, comm=self.comm, eigen_fn=self.eigen_fn, model=self.model,
                                         data=self.data, broadcast=self.broadcast)
        trainer.checkpoints = self.outputs
        resumed_from = None
        if cfg.resume is not None:
            resumed_from = trainer.resume(cfg.resume, collective=self.broadcast)
            refuse_finished(trainer)
        trainer.callbacks = run_callbacks(cfg, self.writer, self.on_epoch, [*self.job_callbacks(), *self.extra])
        with self.hold_out_dir((trainer.epoch, trainer.updates) if cfg.resumes_in_place else None):
            try:
                summary = self.train(lambda: self.fit(resumed_from is not None))
            finally:
                self.close_writers()
            if resumed_from is not None:  # which checkpoint it continued from (a damaged newest is skipped)
                # (named in the run dir: a relayed worker read its copy of that file)
                summary["resumed_from"] = str(Path(cfg.resume).expanduser() / CHECKPOINT_DIR / resumed_from.name)
            summary["out"] = str(self.out)  # (the folder a run without --out got)
            return finish(trainer, summary, self.writer(), self.outputs, self.plot)

    def fit(self, resumed: bool) -> dict[str, Any]:
        """The training itself: fit and a last checkpoint (an elastic job enters it again after
        each reset)."""
        trainer = self.trainer
        if resumed and not self.cfg.resumes_in_place:
            record_history(trainer, self.writer())
        summary = trainer.fit(self.writer())
        trainer.save_checkpoint(self.writer())
        return summary


def _new_run_dir_or_error() -> str | UserError:
    try:
        return new_run_dir()
    except UserError as exc:
        return exc


def train(cfg: TrainConfig, comm: Any = None, eigen_fn: EigenFn | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None, plot: bool = True,
          model: nn.Module | Callable[[], nn.Module] | None = None, data: Any = None,
          callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run `cfg` on one process or a fixed Horovod world (an elastic one: hvd_abs.elastic.worker.train)."""
    return Session(cfg, comm=comm, eigen_fn=eigen_fn, on_epoch=on_epoch, plot=plot, model=model, data=data,
                   callbacks=callbacks).run()


def record_history(trainer: Trainer, writer: MetricsWriter) -> None:
    """Write the epochs and growths a resumed run brings (its state holds them) into a new
    folder's metrics, so that folder records the whole run: the table, the summary and the plots
    then agree. (The old folder's resize and failure events are not in the state.) Idempotent:
    the writer skips epochs and growths it has."""
    for record in trainer.history:
        writer.epoch(**record)
    for growth in trainer.growths:
        writer.event("growth", **{k: v for k, v in growth.items() if k != "event"})


def finish(trainer: Trainer, summary: dict[str, Any], writer: MetricsWriter, outputs: Any,
           plot: bool) -> dict[str, Any]:
    """Rank 0: model.pt, plots.png and the final summary.json, wherever the run's outputs go."""
    if trainer.comm.rank != 0:
        return summary
    return outputs.finish(weights_bytes(trainer.model), summary, plot, writer)
