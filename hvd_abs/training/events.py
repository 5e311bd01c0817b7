"""The trainer's events and the callbacks that react to them (after Composer's Event/Callback).

Everything that is not the update and epoch loop itself (disk checkpoints, the elastic commit
and world-size publication, progress printing, a study's time limit, test instrumentation)
is a `Callback`: the trainer calls each callback's method for an event, in list order. A
callback may raise to leave the loop (an elastic commit raises HostsUpdatedInterrupt).
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from hvd_abs.training.trainer import Trainer


class Event(enum.Enum):
    """When callbacks run, in the order a run meets them."""

    FIT_START = "fit_start"        # fit() entered (for elastic jobs: after each sync)
    UPDATE_END = "update_end"      # one optimizer step done (trainer.updates counts it)
    EPOCH_LOGGED = "epoch_logged"  # the epoch's line is in metrics.jsonl: record=
    GROWTH = "growth"              # the global batch grew after an epoch: growth= (the event line)
    EPOCH_END = "epoch_end"        # the epoch's bookkeeping is done: the state sits at its boundary
    RESIZE = "resize"              # an elastic reset is over: reset= (its metrics event)
    SEND_STATE = "send_state"      # this worker is about to send the job's state to joining workers
    FIT_END = "fit_end"            # fit() is done: summary=


class Callback:
    """Base class: one no-op method per event; override those you need."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_update_end(self, trainer: "Trainer") -> None: ...

    def on_epoch_logged(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...

    def on_growth(self, trainer: "Trainer", growth: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: "Trainer") -> None: ...

    def on_resize(self, trainer: "Trainer", reset: dict[str, Any]) -> None: ...

    def on_send_state(self, trainer: "Trainer") -> None: ...

    def on_fit_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None: ...


def fire(callbacks: Iterable[Callback], event: Event, trainer: "Trainer", **payload: Any) -> None:
    """Run `event` on each callback in order."""
    method = f"on_{event.value}"
    for cb in callbacks:
        getattr(cb, method)(trainer, **payload)
