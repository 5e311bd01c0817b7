"""The callbacks every run may have: disk checkpoints, progress on rank 0, --stop-at-update, and
the user's own (--callback MODULE:NAME)."""
from __future__ import annotations

import datetime
import importlib
import sys
import time
from typing import Any, Callable

from hvd_abs.errors import UserError
from hvd_abs.metrics import MetricsWriter
from hvd_abs.training.events import Callback
from hvd_abs.training.trainer import StopRequested, Trainer


class CheckpointEvery(Callback):
    """A disk checkpoint every --checkpoint-every epochs (the run's last one is the session's)."""

    def __init__(self, writer: Callable[[], MetricsWriter]) -> None:
        self.writer = writer  # the writer of whoever is rank 0 now (it may change in elastic jobs)

    def on_epoch_end(self, trainer: Trainer) -> None:
        every = trainer.cfg.checkpoint_every
        if every and trainer.epoch % every == 0 and trainer.epoch < trainer.cfg.epochs:
            trainer.save_checkpoint(self.writer())


class StopAtUpdate(Callback):
    """Leave the loop once `updates` updates are done (restart benchmarks): the session then
    checkpoints as at the run's end."""

    def __init__(self, updates: int) -> None:
        self.updates = updates

    def _check(self, trainer: Trainer) -> None:
        if trainer.updates >= self.updates:
            raise StopRequested

    on_fit_start = on_update_end = _check


class EchoEpochs(Callback):
    """Each epoch's line to `show` on rank 0 (the live table of `hvd-abs train`)."""

    def __init__(self, show: Callable[[dict[str, Any]], None]) -> None:
        self.show = show

    def on_epoch_logged(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.comm.rank == 0:
            self.show(record)


def epoch_loss(trainer: Trainer) -> float:
    """The training loss of the epoch so far (over all ranks; reading it waits for the device)."""
    loss_sum, _, count = trainer._epoch_sums[:3].tolist()
    return loss_sum / max(count, 1)


class ProgressBar(Callback):
    """A tqdm bar of the epoch's updates on rank 0, when stderr is a terminal, with the epoch's
    loss so far (read every 10 updates: each read waits for the device)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_update_end(self, trainer: Trainer) -> None:
        if trainer.comm.rank != 0 or not sys.stderr.isatty():
            return
        if self.bar is None:
            from tqdm import tqdm

            G = trainer.controller.global_batch
            self.bar = tqdm(total=trainer.sampler.steps_left(G) + 1, initial=0, leave=False, dynamic_ncols=True,
                            desc=f"epoch {trainer.epoch + 1}/{trainer.cfg.epochs} G={G}")
        self.bar.update(1)
        if self.bar.n % 10 == 1:
            self.bar.set_postfix(loss=f"{epoch_loss(trainer):.4f}", refresh=False)

    def on_epoch_logged(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_fit_end = lambda self, trainer, summary: self.on_epoch_logged(trainer, summary)  # noqa: E731


class ProgressLines(Callback):
    """Every `every` updates, one line on rank 0 when stderr is not a terminal (under the
    launchers, where no bar shows): epoch, update, batch, the epoch's loss so far, samples/s since
    the last line, and the ETA of the planned samples at that rate."""

    def __init__(self, every: int, show: Callable[[str], None]) -> None:
        self.every, self.show = every, show
        self.mark: tuple[float, int] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.mark = (time.perf_counter(), trainer.samples_seen)  # (an elastic reset starts the rate anew)

    def on_update_end(self, trainer: Trainer) -> None:
        if trainer.comm.rank != 0 or trainer.updates % self.every or sys.stderr.isatty():
            return
        now, seen = time.perf_counter(), trainer.samples_seen
        t0, seen0 = self.mark or (now, seen)
        self.mark = (now, seen)
        rate = (seen - seen0) / (now - t0) if now > t0 else 0.0
        left = trainer.cfg.epochs * trainer.sampler.num_samples - seen
        eta = datetime.timedelta(seconds=round(left / rate)) if rate > 0 else "-"
        self.show(f"epoch {trainer.epoch + 1}/{trainer.cfg.epochs}  update {trainer.updates}  batch "
                  f"{trainer.controller.global_batch}  loss {epoch_loss(trainer):.4f}  samples/s {rate:.0f}  "
                  f"eta {eta}")


def user_callbacks(names: Any) -> list[Callback]:
    """The callbacks that --callback MODULE:NAME names, each made by calling NAME()."""
    made = []
    for spec in names:
        module, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"--callback {spec}: cannot load it ({type(exc).__name__}: {exc}): give MODULE:NAME of "
                            f"a Callback class importable on every worker") from None
        cb = factory()
        if not isinstance(cb, Callback):
            raise UserError(f"--callback {spec} made a {type(cb).__name__}, not a hvd_abs.training.Callback: "
                            f"subclass Callback")
        made.append(cb)
    return made


def run_callbacks(cfg: Any, writer: Callable[[], MetricsWriter], on_epoch: Callable[[dict], None] | None = None,
                  extra: Any = ()) -> list[Callback]:
    """A run's callbacks, in order: progress (a bar unless quiet; `on_epoch` gets each epoch's
    line on rank 0), the periodic checkpoint, the user's own (--callback: they see an update
    before an elastic job commits it), `extra` (an elastic job's commit, a caller's), and
    --stop-at-update last (after everything an update's end does)."""
    cbs: list[Callback] = [] if cfg.quiet else [ProgressBar()]
    if not cfg.quiet and cfg.log_every:
        cbs.append(ProgressLines(cfg.log_every, lambda line: print(line, file=sys.stderr, flush=True)))
    if on_epoch is not None:
        cbs.append(EchoEpochs(on_epoch))
    cbs += [CheckpointEvery(writer), *user_callbacks(cfg.callbacks), *extra]
    if cfg.stop_at_update is not None:
        cbs.append(StopAtUpdate(cfg.stop_at_update))
    return cbs
