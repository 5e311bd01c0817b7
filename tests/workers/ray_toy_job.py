"""A tiny real elastic Horovod job for the Ray executor's dead-worker test.

Each step allreduces a one (the sum is the world size), sleeps `step_s` (the "compute"), appends
the step index, world size and time to a ledger and commits. The ledger lives in the committed
state, so after any rollback it holds each committed step exactly once: a gap or a repeat means
a lost or doubled step.
"""
from __future__ import annotations

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


def toy_job(run_dir: str, steps: int, step_s: float = 0.1, crash_at: tuple[int, int] | None = None,
            hold_until_size: dict[int, int] | None = None) -> dict[str, Any]:
    """Run `steps` committed steps elastically; return this worker's final ledger and resets.
    `crash_at=(step, rank)`: that rank's process dies (exit 1, once per run dir) after that
    step's allreduce, before its commit: a dead worker actor.
    `hold_until_size={step: n}`: at that step the world waits (60 s at most) until it has n
    workers, so a rejoin lands before the job ends however loaded the machine is. The wait
    checks for host updates, so a worker that joins interrupts it (a reset) and the step is
    redone in the new world."""
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
            if hold_until_size and led.step in hold_until_size:
                deadline = time.time() + 60
                # Every rank of this world polls together: check_host_updates is a collective.
                while hvd.size() < hold_until_size[led.step] and time.time() < deadline:
                    state.check_host_updates()
                    time.sleep(0.05)
            led.steps.append(led.step)
            led.sizes.append(size)
            led.times.append(time.time())
            led.step += 1
            state.commit()
        return led.state_dict()

    final = run_elastic(train, state, on_reset=lambda kind, s: resets.append((kind, s)))
    return {"ledger": final, "resets": resets, "rank": hvd.rank(), "size": hvd.size()}
