"""The ledger (`--callback hvd_abs.testing.ledger:Ledger`): each rank appends the sample ids of
every update it runs to <out>/ledger/rank-<pid>.jsonl, tagged with the loop entry (attempt) they
belong to, so that a test can check that a resize or a failure lost or repeated no sample. The
committed history is, for each update number, the records of its latest attempt. Hold files
let a test stop the job at a known update, or the worker about to send the state to a joiner."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hvd_abs.elastic.job import ElasticCommit
from hvd_abs.training.events import Callback
from hvd_abs.training.trainer import Trainer


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _flatten(v, f"{prefix}/{k}")]
    return [(prefix, tree)]


def _attempt_id(comm: Any) -> int:
    """One id per entry into the loop, the same on every rank and larger for later entries."""
    return int(comm.broadcast_object(time.time_ns() if comm.rank == 0 else None))


def _wait_while_exists(gate: Path, limit_s: float, on_wait: Callable[[], None] = lambda: None) -> None:
    """A hold: sleep while the test's `gate` file exists, at most `limit_s`."""
    deadline = time.monotonic() + limit_s
    while gate.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
        on_wait()


class Ledger(Callback):
    """Records each update (before the job commits it); its `Holds` run after the commit."""

    def __init__(self) -> None:
        self.attempt = 0
        self.path: Path | None = None
        self.holds = Holds(self)

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.path is None:
            d = Path(trainer.cfg.out).expanduser() / "ledger"
            d.mkdir(parents=True, exist_ok=True)
            self.path = d / f"rank-{os.getpid()}.jsonl"
        if self.holds not in trainer.callbacks:
            trainer.callbacks.append(self.holds)  # last: after the elastic commit of each update
        self.attempt = _attempt_id(trainer.comm)
        self.write_digest(trainer)

    def write_digest(self, trainer: Trainer) -> None:
        """After a sync: a hash of this rank's model and optimizer state (bit-identical ranks
        have equal digests)."""
        h = hashlib.sha256()
        for tree in (trainer.model.state_dict(), trainer.optimizer.state_dict()["state"]):
            for key, value in sorted(_flatten(tree), key=lambda kv: kv[0]):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes() if hasattr(value, "detach")
                         else repr(value).encode())
        with open(self.path.with_name(self.path.name.replace("rank-", "sync-")), "a") as f:
            f.write(json.dumps({"attempt": self.attempt, "rank": trainer.comm.rank,
                                "updates": trainer.updates, "digest": h.hexdigest()}) + "\n")

    def on_update_end(self, trainer: Trainer) -> None:
        ids = torch.cat(trainer.last_micros).tolist() if trainer.last_micros else []
        with open(self.path, "a") as f:
            f.write(json.dumps({"attempt": self.attempt, "update": trainer.updates, "epoch": trainer.last_step_epoch,
                                "t": time.time(), "rank": trainer.comm.rank, "world_size": trainer.comm.size,
                                "ids": ids, "warm_loader": trainer.inputs.warm}) + "\n")

    def on_send_state(self, trainer: Trainer, limit_s: float = 300.0) -> None:
        """While `<out>/ledger/hold-sync` exists, the worker about to send the state to a joiner
        waits (after writing its pid to `<out>/ledger/syncing`), so that a test can kill it there."""
        gate = self.path.parent / "hold-sync"
        if not gate.exists():
            return
        (self.path.parent / "syncing").write_text(str(os.getpid()))
        _wait_while_exists(gate, limit_s)


class Holds(Callback):
    """Pin a fault or a resize to a known update on a loaded machine. After update U, while
    `<out>/ledger/hold-U` exists, every rank waits (no collective). With `hold-U-world-W`, the
    job waits until W workers run, committing every 0.1 s so the pending resize gets in (every
    rank runs the same loop: the size is the same on all, and the file is not consulted again,
    so the commits stay collective). At most `limit_s`. The wait is the test's, not a stall of
    the job: the job's timeline is moved along while waiting."""

    def __init__(self, ledger: Ledger, limit_s: float = 300.0) -> None:
        self.ledger, self.limit_s = ledger, limit_s

    def on_update_end(self, trainer: Trainer) -> None:
        job = next((cb for cb in trainer.callbacks if isinstance(cb, ElasticCommit)), None)
        on_wait = job.timeline.touch if job is not None else (lambda: None)
        u, size = trainer.updates, trainer.comm.size
        for f in self.ledger.path.parent.glob("hold-*"):
            parts = f.name.split("-")
            if not parts[1].isdigit() or int(parts[1]) != u:
                continue
            want = int(parts[3]) if len(parts) == 4 and parts[2] == "world" and parts[3].isdigit() else None
            if want is None:
                _wait_while_exists(f, self.limit_s, on_wait)
                continue
            deadline = time.monotonic() + self.limit_s
            while size != want and time.monotonic() < deadline:
                time.sleep(0.1)
                on_wait()
                job.state.commit()  # raises HostsUpdatedInterrupt once the resize this waits for comes
