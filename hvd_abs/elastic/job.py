"""An elastic training job: the trainer inside Horovod's elastic loop (hvd_runner.run_elastic).

    hvd.init(); build the trainer (no collective: new workers may be joining)
    run_elastic(loop, CommittedState(trainer)):
        sync from rank 0  ->  recompute what depends on the world size (threads; the layout, LR and
                              this rank's samples are recomputed at every step anyway)
        rank 0 publishes wanted = min(max_np, ceil(G / base_batch))       [world-size signal]
        fit(): after every --commit-every updates, every growth and every epoch end: commit
               (a commit may raise HostsUpdatedInterrupt: hosts changed -> reset -> re-enter)
    a worker failure (HorovodInternalError) rolls every survivor back to the last commit

Metrics get a `resize` or `failure` event for every reset with its stall: from the end of the
last update before it to the end of the first update after it, minus one update's time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable


from hvd_abs.batching.layout import wanted_world_size
from hvd_abs.elastic.world_signal import write_wanted
from hvd_abs.metrics import MetricsWriter, cut_back
from hvd_abs.train import (Trainer, TrainConfig, checkpoint_if_due, finish, open_writer, prepare_out_dir,
                           record_history, refuse_finished)

log = logging.getLogger(__name__)


class _Timeline:
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


def train_elastic(cfg: TrainConfig, eigen_fn: Any = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                  plot: bool = True, model: Any = None, data: Any = None) -> dict[str, Any]:
    """Run `cfg` as one worker of an elastic job (under horovodrun --min-np/--max-np or the Ray
    executor). model, data: as for Trainer. Returns the summary (complete on rank 0)."""
    import horovod.torch as hvd

    from hvd_abs.comm import HorovodComm
    from hvd_abs.elastic.hvd_runner import CommittedState, run_elastic

    comm = HorovodComm()  # hvd.init()
    trainer = Trainer(cfg, comm=comm, eigen_fn=eigen_fn, model=model, data=data, broadcast=False)
    out = Path(cfg.out).expanduser()
    if cfg.resume is not None:
        trainer.resume(cfg.resume, collective=False)
        refuse_finished(trainer)
    if comm.rank == 0:
        _prepare_once(out, cfg.replaces_out, (trainer.epoch, trainer.updates) if cfg.resumes_in_place else None)
    state = CommittedState(trainer, run_dir=str(out))
    timeline = _Timeline()
    ledger = _Ledger(out, trainer) if cfg.ledger else None
    if ledger is not None:
        state.before_broadcast = ledger.hold_sync
    writers: dict[int, MetricsWriter] = {}

    def writer() -> MetricsWriter:
        # The writer belongs to whoever is rank 0 now (rank 0 may change across a failure).
        rank = comm.rank
        if rank not in writers:
            for w in writers.values():
                w.close()
            writers.clear()
            writers[rank] = open_writer(out, cfg, rank)
        return writers[rank]

    def publish() -> None:
        if comm.rank == 0:
            want = wanted_world_size(trainer.controller.global_batch, cfg.base_batch, cfg.max_np)
            write_wanted(out, want, reason=f"global batch {trainer.controller.global_batch}")

    def on_step() -> None:
        if ledger is not None:
            ledger.write()
        done = timeline.step_done()
        if done is not None:
            writer().event(done.pop("kind"), epoch=trainer.epoch + 1, updates=trainer.updates,
                           world_size=comm.size, **done)
        if trainer.updates % cfg.commit_every == 0:
            state.commit()
        if ledger is not None:
            ledger.hold(state, on_wait=timeline.touch)

    def on_epoch_end(grew: bool) -> None:
        # The disk checkpoint first: the commit may raise HostsUpdatedInterrupt, and the state
        # is the same either way (a redone epoch end rewrites the same file atomically).
        checkpoint_if_due(trainer, writer())
        state.commit()  # every growth and epoch end is committed
        if grew:
            publish()  # also done on re-entry, should the commit above have raised

    def on_reset(kind: str, seconds: float) -> None:
        trainer.set_threads()
        timeline.pending = {"kind": kind, "since": timeline.last_end, "reinit_s": seconds,
                            "commit_s": state.commit_s}

    def loop(_state: CommittedState) -> dict[str, Any]:
        trainer.on_step, trainer.on_epoch_end = on_step, on_epoch_end
        if ledger is not None:
            ledger.attempt = _attempt_id(comm)
            ledger.write_digest()
        publish()
        if cfg.resume is not None and not cfg.resumes_in_place:
            record_history(trainer, writer())
        summary = trainer.fit(writer(), on_epoch=on_epoch)
        trainer.save_checkpoint(writer())
        return summary

    try:
        summary = run_elastic(loop, state, on_reset=on_reset)
        summary.update(commit_s=state.commit_s, commits=state.commits, world_size=hvd.size())
        return finish(trainer, summary, writer(), out, plot)
    finally:
        for w in writers.values():
            w.close()


def _prepare_once(out: Path, overwrite: bool, resumed_at: tuple[int, int] | None) -> None:
    """Prepare the out dir (with --overwrite: clear the previous run; resumed in place at
    (epoch, updates): drop the metrics lines after the checkpoint) once per job: a worker that
    becomes rank 0 later in the same job (after a failure) must not clear what this job wrote.
    The job is told apart by its rendezvous endpoint, which horovodrun picks per launch."""
    job = f"{os.environ.get('HOROVOD_GLOO_RENDEZVOUS_ADDR')}:{os.environ.get('HOROVOD_GLOO_RENDEZVOUS_PORT')}"
    marker = out / "elastic" / "job"
    if marker.exists() and marker.read_text() == job:
        return
    prepare_out_dir(out, overwrite)
    if resumed_at is not None:
        cut_back(out, *resumed_at)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(job)


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _flatten(v, f"{prefix}/{k}")]
    return [(prefix, tree)]


def _attempt_id(comm: Any) -> int:
    """One id per entry into the loop, the same on every rank and larger for later entries."""
    return int(comm.broadcast_object(time.time_ns() if comm.rank == 0 else None))


class _Ledger:
    """Test instrumentation (--ledger): each rank appends the sample ids of every update it runs
    to <out>/ledger/rank-<pid>.jsonl, tagged with the loop entry (attempt) they belong to. The
    committed history is, for each update number, the records of its latest attempt. Hold files
    (`hold`) let a test stop the job at a known update."""

    def __init__(self, out: Path, trainer: Trainer) -> None:
        self.trainer = trainer
        self.attempt = 0
        d = out / "ledger"
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"rank-{os.getpid()}.jsonl"

    def write_digest(self) -> None:
        """After a sync: a hash of this rank's model and optimizer state (bit-identical ranks
        have equal digests)."""
        h = hashlib.sha256()
        for tree in (self.trainer.model.state_dict(), self.trainer.optimizer.state_dict()["state"]):
            for key, value in sorted(_flatten(tree), key=lambda kv: kv[0]):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes() if hasattr(value, "detach")
                         else repr(value).encode())
        with open(self.path.with_name(self.path.name.replace("rank-", "sync-")), "a") as f:
            f.write(json.dumps({"attempt": self.attempt, "rank": self.trainer.comm.rank,
                                "updates": self.trainer.updates, "digest": h.hexdigest()}) + "\n")

    def hold(self, state: Any, on_wait: Callable[[], None], limit_s: float = 300.0) -> None:
        """Test instrumentation: pin a fault or a resize to a known update on a loaded machine.
        After update U, while `<out>/ledger/hold-U` exists, every rank waits (no collective).
        With `hold-U-world-W`, the job waits until W workers run, committing every 0.1 s so the
        pending resize gets in (every rank runs the same loop: the size is the same on all, and
        the file is not consulted again, so the commits stay collective). At most `limit_s`.
        `on_wait` is called while waiting: the wait is the test's, not a stall of the job."""
        u, size = self.trainer.updates, self.trainer.comm.size
        for f in self.path.parent.glob("hold-*"):
            parts = f.name.split("-")
            if not parts[1].isdigit() or int(parts[1]) != u:
                continue
            want = int(parts[3]) if len(parts) == 4 and parts[2] == "world" and parts[3].isdigit() else None
            if want is None:
                _wait_while_exists(f, limit_s, on_wait)
                continue
            deadline = time.monotonic() + limit_s
            while size != want and time.monotonic() < deadline:
                time.sleep(0.1)
                on_wait()
                state.commit()  # raises HostsUpdatedInterrupt once the resize this waits for comes

    def hold_sync(self, limit_s: float = 300.0) -> None:
        """Test instrumentation: while `<out>/ledger/hold-sync` exists, the worker about to send
        the state to a joiner waits (after writing its pid to `<out>/ledger/syncing`), so that a
        test can kill it there. At most `limit_s`."""
        gate = self.path.parent / "hold-sync"
        if not gate.exists():
            return
        (self.path.parent / "syncing").write_text(str(os.getpid()))
        _wait_while_exists(gate, limit_s)

    def write(self) -> None:
        t = self.trainer
        ids = t.last_step_ids.tolist() if t.last_step_ids is not None else []
        with open(self.path, "a") as f:
            f.write(json.dumps({"attempt": self.attempt, "update": t.updates, "epoch": t.last_step_epoch, "t": time.time(),
                                "rank": t.comm.rank, "world_size": t.comm.size, "ids": ids}) + "\n")


def _wait_while_exists(gate: Path, limit_s: float, on_wait: Callable[[], None] = lambda: None) -> None:
    """A ledger hold: sleep while the test's `gate` file exists, at most `limit_s`."""
    deadline = time.monotonic() + limit_s
    while gate.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
        on_wait()
