"""A tiny real elastic Horovod job for the Ray executor's dead-worker test.

Each step allreduces a one (the sum is the world size), sleeps `step_s` (the "compute"), appends
the step index, world size and time to a ledger and commits. The ledger lives in the committed
state, so after any rollback it holds each committed step exactly once: a gap or a repeat means
a lost or doubled step. Rank 0 publishes a progress file for the scenario driver.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Ledger:
    """The job's whole state: next step, and per committed step its index, world size, time."""

    def __init__(self) -> None:
        self.step, self.steps, self.sizes, self.times = 0, [], [], []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "steps": list(self.steps), "sizes": list(self.sizes), "times": list(self.times)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.steps, self.sizes, self.times = list(state["steps"]), list(state["sizes"]), list(state["times"])


def write_progress(run_dir: str, step: int, size: int) -> None:
    path = Path(run_dir) / "progress.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"step": step, "size": size, "time": time.time()}))
    os.replace(tmp, path)


def read_progress(run_dir: str) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"step": -1, "size": 0}


def toy_job(run_dir: str, steps: int, step_s: float = 0.1, crash_at: tuple[int, int] | None = None,
            hold_at: dict[int, str] | None = None) -> dict[str, Any]:
    """Run `steps` committed steps elastically; return this worker's final ledger and resets.
    `crash_at=(step, rank)`: that rank's process dies (exit 1, once per run dir) after that
    step's allreduce, before its commit: a dead worker actor.
    `hold_at={step: name}`: rank 0 waits (60 s at most) at that step until the file `name` exists
    in the run dir, so a scenario's cluster change lands at a known step on a loaded machine."""
    import horovod.torch as hvd
    import torch

    from hvd_abs.elastic.hvd_runner import CommittedState, run_elastic

    hvd.init()
    state = CommittedState(Ledger())
    resets: list[tuple[str, float]] = []

    def train(state: CommittedState) -> dict[str, Any]:
        led = state.target
        while led.step < steps:
            size = int(hvd.allreduce(torch.ones(1), op=hvd.Sum, name="toy.size").item())
            if size != hvd.size():
                raise RuntimeError(f"allreduce saw {size} workers, Horovod says {hvd.size()}")
            if crash_at and (led.step, hvd.rank()) == tuple(crash_at):
                marker = Path(run_dir) / "crashed"
                if not marker.exists():
                    marker.touch()
                    os._exit(1)
            time.sleep(step_s)
            if hvd.rank() == 0 and hold_at and led.step in hold_at:
                gate, deadline = Path(run_dir) / hold_at[led.step], time.time() + 60
                while not gate.exists() and time.time() < deadline:
                    time.sleep(0.05)
            led.steps.append(led.step)
            led.sizes.append(size)
            led.times.append(time.time())
            led.step += 1
            if hvd.rank() == 0:
                write_progress(run_dir, led.step, size)
            state.commit()
        return led.state_dict()

    final = run_elastic(train, state, on_reset=lambda kind, s: resets.append((kind, s)))
    return {"ledger": final, "resets": resets, "rank": hvd.rank(), "size": hvd.size()}
