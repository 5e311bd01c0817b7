"""An elastic training job: the session run inside Horovod's elastic loop (hvd_runner.run_elastic).

    hvd.init(); build the trainer (no collective: new workers may be joining)
    run_elastic(loop, CommittedState(trainer)):
        sync from a worker holding the state  ->  recompute what depends on the world size
                              (threads; the layout, LR and this rank's samples are recomputed at
                              every step anyway)
        rank 0 publishes wanted = min(max_np, ceil(G / base_batch))       [world-size signal]
        fit(): after every --commit-every updates, every growth and every epoch end: commit
               (a commit may raise HostsUpdatedInterrupt: hosts changed -> reset -> re-enter)
    a worker failure (HorovodInternalError) rolls every survivor back to the last commit

Metrics get a `resize` or `failure` event for every reset with its stall: from the end of the
last update before it to the end of the first update after it, minus one update's time.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from hvd_abs.batching.layout import wanted_world_size
from hvd_abs.elastic.world_signal import publish_wanted
from hvd_abs.metrics import MetricsWriter
from hvd_abs.training.config_file import to_yaml
from hvd_abs.training.events import Callback, Event
from hvd_abs.training.outputs import LocalOutputs
from hvd_abs.training.session import Session
from hvd_abs.training.trainer import Trainer


class Timeline:
    """Update end times (this process's clock) and the resets between them, for stall figures."""

    def __init__(self) -> None:
        self.last_end: float | None = None
        self.durations: list[float] = []
        self.pending: dict[str, Any] | None = None

    def touch(self) -> None:
        """Move the last update's end to now (time spent waiting on purpose is no stall)."""
        self.last_end = time.perf_counter()

    def step_done(self) -> dict[str, Any] | None:
        """Record an update's end; returns the finished reset record when one was pending."""
        now = time.perf_counter()
        if self.last_end is not None and self.pending is None:
            self.durations = (self.durations + [now - self.last_end])[-20:]
        done = None
        if self.pending is not None:
            step_s = statistics.median(self.durations) if self.durations else 0.0
            gap = now - self.pending.pop("since") if self.pending.get("since") is not None else None
            done = {**self.pending, "step_s": step_s,
                    "stall_s": max(0.0, gap - step_s) if gap is not None else None}
            self.pending = None
        self.last_end = now
        return done


class ElasticCommit(Callback):
    """The job's side of each event: commits (every --commit-every updates, every epoch end),
    the world size it wants (at each entry and after a growth), and each reset's metrics line."""

    def __init__(self, job: "ElasticSession") -> None:
        self.job = job
        self.state: Any = None  # the CommittedState, once the job has made it
        self.timeline = Timeline()
        self._grew = False

    def publish(self, trainer: Trainer) -> None:
        if trainer.comm.rank == 0:
            G = trainer.controller.global_batch
            publish_wanted(self.job.out, wanted_world_size(G, trainer.cfg.base_batch, trainer.cfg.max_np),
                         reason=f"global batch {G}")

    def on_fit_start(self, trainer: Trainer) -> None:
        self.publish(trainer)  # also after a reset: a growth's commit may have raised before it was said

    def on_update_end(self, trainer: Trainer) -> None:
        done = self.timeline.step_done()
        if done is not None:
            reset = self.job.writer().event(done.pop("kind"), epoch=trainer.epoch + 1, updates=trainer.updates,
                                            world_size=trainer.comm.size, **done)
            trainer.fire(Event.RESIZE, reset=reset)
        if trainer.updates % trainer.cfg.commit_every == 0:
            self.state.commit()

    def on_growth(self, trainer: Trainer, growth: dict[str, Any]) -> None:
        self._grew = True

    def on_epoch_end(self, trainer: Trainer) -> None:
        # After the disk checkpoint (CheckpointEvery runs first): the commit may raise
        # HostsUpdatedInterrupt, and the state is the same either way.
        self.state.commit()
        if self._grew:
            self._grew = False
            self.publish(trainer)

    def on_reset(self, kind: str, seconds: float) -> None:
        self.job.trainer.set_threads()
        self.timeline.pending = {"kind": kind, "since": self.timeline.last_end, "reinit_s": seconds,
                                 "commit_s": self.state.commit_s}


class ElasticSession(Session):
    """`cfg` as one worker of an elastic job (under horovodrun --min-np/--max-np or the Ray
    executor): the run's lock is the launcher's, for the whole job."""

    broadcast = False

    def __init__(self, cfg: Any, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.commit = ElasticCommit(self)
        self._rank_of_writer: int | None = None

    def make_outputs(self) -> Any:
        # Relayed to the launcher's host when it set up a job channel (rank 0 may be anywhere).
        from hvd_abs.elastic.job_channel import JobChannel
        from hvd_abs.elastic.outputs_relay import RelayOutputs

        channel = JobChannel.from_env()
        loggers = self.cfg.loggers
        return RelayOutputs(channel, loggers) if channel is not None else LocalOutputs(self.out, loggers)

    def make_comm(self) -> Any:
        from hvd_abs.comm import HorovodComm

        return HorovodComm()  # hvd.init()

    @contextlib.contextmanager
    def hold_out_dir(self, resumed_at: tuple[int, int] | None) -> Iterator[None]:
        if self.comm.rank == 0:
            config = to_yaml(self.cfg)
            if isinstance(self.outputs, LocalOutputs):
                _prepare_once(self.out, self.cfg.replaces_out, resumed_at, config)
            else:
                self.outputs.prepare(self.cfg.replaces_out, resumed_at, config)
        yield

    def writer(self) -> MetricsWriter:
        # The writer belongs to whoever is rank 0 now (rank 0 may change across a failure).
        rank = self.comm.rank
        if self._writer is None or self._rank_of_writer != rank:
            self.close_writers()
            self._writer, self._rank_of_writer = self.outputs.writer(rank, self.cfg.resumes_in_place), rank
        return self._writer

    def job_callbacks(self) -> list[Callback]:
        return [self.commit]

    def train(self, fit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        import horovod.torch as hvd

        from hvd_abs.elastic.hvd_runner import CommittedState, run_elastic

        trainer = self.trainer
        state = self.commit.state = CommittedState(trainer, run_dir=str(self.out),
                                                   on_send=lambda: trainer.fire(Event.SEND_STATE))
        summary = run_elastic(lambda _state: fit(), state, on_reset=self.commit.on_reset)
        summary.update(commit_s=state.commit_s, commits=state.commits, world_size=hvd.size())
        return summary


def train_elastic(cfg: Any, **kwargs: Any) -> dict[str, Any]:
    """Run `cfg` as one worker of an elastic job. kwargs: as for Session. Returns the summary
    (complete on rank 0)."""
    return ElasticSession(cfg, **kwargs).run()


def _prepare_once(out: Path, overwrite: bool, resumed_at: tuple[int, int] | None, config: str) -> None:
    """Prepare the out dir (with --overwrite: clear the previous run; resumed in place at
    (epoch, updates): drop the metrics lines after the checkpoint) once per job: a worker that
    becomes rank 0 later in the same job (after a failure) must not clear what this job wrote.
    The job is told apart by its rendezvous endpoint, which horovodrun picks per launch."""
    job = f"{os.environ.get('HOROVOD_GLOO_RENDEZVOUS_ADDR')}:{os.environ.get('HOROVOD_GLOO_RENDEZVOUS_PORT')}"
    marker = out / "elastic" / "job"
    if marker.exists() and marker.read_text() == job:
        return
    LocalOutputs(out).prepare(overwrite, resumed_at, config)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(job)
