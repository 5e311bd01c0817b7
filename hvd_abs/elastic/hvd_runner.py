"""Horovod's elastic mode, made correct for adaptive batches. The only module of the elastic
layer that imports Horovod; it is imported only by jobs started with `--elastic`.

Contract (Horovod's, kept): no collective runs before `run_elastic` enters the training function;
everything a resize touches (per-worker share, accumulation steps, this rank's samples, LR) is
recomputed from the synced state, never carried across a reset.

Where this differs from `horovod.torch.elastic.run` + `TorchState`, and why:
- Every reset is followed by a sync, also a removal-only one: Horovod skips it (horovod#3494
  deadlock below min-np, #3399 sampler left partitioned for the old world).
- The state is the trainer's whole `state_dict()` (model, optimizer, controller, LR inputs,
  adversarial schedule, sampler cursor, counters, RNG, metrics), committed to host memory: no
  second copy on the GPU, and nothing pickled whole that cannot be rolled back.
- A new worker loads rank 0's optimizer state as it is, so it starts bit-identical to rank 0: no
  zero-gradient optimizer step to materialise state (which drifts weights under weight decay).
- The sync's source is a worker that holds the job's state (has synced or committed), not
  whichever worker is rank 0: when rank 0 dies while a worker joins, a joiner may become rank 0,
  and broadcasting its freshly built state would silently restart the run from its beginning.
  When every worker holding the state is gone, the job stops (StateLost) and says to resume
  from the newest checkpoint.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

import horovod.torch as hvd
from horovod.common.elastic import State, notification_manager
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

from hvd_abs.training.checkpoint import to_host
from hvd_abs.errors import UserError

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StateLost(UserError):
    """Every worker that held the job's state failed before a joiner had it: what is left is
    the joiners' freshly built state, not the run's. Said on every survivor."""


class CommittedState(State):
    """Horovod elastic State over one `Stateful` target (the trainer).

    commit() = snapshot to host memory + check for host updates (may raise
    HostsUpdatedInterrupt on every rank at the same commit); restore() = back to the last
    snapshot; sync() = the state of a rank that holds it (rank 0 but for a failure during a
    join) to every rank.
    """

    def __init__(self, target: Stateful, run_dir: str = "OUT", on_send: Callable[[], None] | None = None) -> None:
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.target = target
        self.run_dir = run_dir  # for StateLost's advice
        self._saved: dict[str, Any] | None = None
        self.commit_s = 0.0  # total seconds spent snapshotting, for the metrics
        self.commits = 0
        self.seen_holder = False  # a sync this worker took part in had a holder of the job's state
        self.on_send = on_send  # called on the worker about to send the state to joiners

    def save(self) -> None:
        t0 = time.perf_counter()
        self._saved = to_host(self.target.state_dict())
        self.commit_s += time.perf_counter() - t0
        self.commits += 1

    def restore(self) -> None:
        if self._saved is not None:
            self.target.load_state_dict(self._saved)

    def sync(self) -> None:
        """The state of the lowest rank holding the job's state to every rank; rank 0's at the
        job's start, when none holds it yet. StateLost if the holders are gone (see the module)."""
        holders = hvd.allgather_object(self._saved is not None, name="hvd_abs.holders")
        self.seen_holder = self.seen_holder or any(holders)
        if not any(holders) and any(hvd.allgather_object(self.seen_holder, name="hvd_abs.seen")):
            raise StateLost(f"the workers that held the run's state failed while another worker was joining, so "
                            f"the state in memory is lost (the survivors hold only a fresh start): continue the run "
                            f"from its newest checkpoint with --resume {self.run_dir}")
        root = holders.index(True) if any(holders) else 0
        if any(holders) and not all(holders) and hvd.rank() == root and self.on_send is not None:
            self.on_send()
        snapshot = to_host(self.target.state_dict()) if hvd.rank() == root else None
        snapshot = hvd.broadcast_object(snapshot, root_rank=root, name="hvd_abs.state")
        self.target.load_state_dict(snapshot)
        self._saved = snapshot


ResetHook = Callable[[str, float], None]


def run_elastic(fn: Callable[[CommittedState], Any], state: CommittedState,
                on_reset: ResetHook | None = None) -> Any:
    """Run `fn(state)` until it returns, across resizes and worker failures.

    On HostsUpdatedInterrupt (hosts added or removed) and on HorovodInternalError (a worker died:
    roll back to the last commit first), Horovod is re-initialised for the new world, the state
    is synced from rank 0, and `fn` is entered again. `on_reset(kind, seconds)` is told of each
    reset ("resize" or "failure") and how long re-initialisation and sync took.
    """
    notification_manager.init()
    notification_manager.register_listener(state)
    try:
        pending: tuple[str, float] | None = None
        while True:
            try:
                state.sync()  # always: also after removal-only resets (horovod#3494, #3399)
                if pending is not None and on_reset is not None:
                    kind, t0 = pending
                    on_reset(kind, time.perf_counter() - t0)
                pending = None
                return fn(state)
            except HorovodInternalError:
                log.warning("a worker failed: rolling back to the last commit")
                state.restore()
                pending = ("failure", time.perf_counter())
            except HostsUpdatedInterrupt:
                log.info("hosts changed: re-initialising Horovod for the new world")
                pending = ("resize", time.perf_counter())
            hvd.shutdown()
            hvd.init()
            state.on_reset()
    finally:
        notification_manager.remove_listener(state)
