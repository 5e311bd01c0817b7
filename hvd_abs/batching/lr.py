"""The learning rate as a pure function of (epoch, progress in the epoch, controller state).

    lr = min(cap, base_lr * decay factor * growth_scale * warm-up)

- Step decay (`schedule="step"`, the reference): epochs are counted from 0; the factor `decay`
  applies from epoch index d on for each d in `decay_epochs` (d = 30 means "after 30 full epochs").
- Cosine (`schedule="cosine"`): the factor is (1 + cos(pi t / E)) / 2 at t = epoch + fraction of
  `total_epochs` E, from 1 at the start to 0 at the end, smooth within epochs.
- Growth scaling per doubling (ratio r = global_batch / initial_batch): linear -> r (x2 per
  doubling, the reference's default), sqrt -> sqrt(r), none -> 1.
- Warm-up (`warmup_epochs` w > 0; 0 = off, the reference): a linear ramp over w epochs, measured in
  epoch fractions (epoch + position / epoch_samples), so it is independent of the world size and of
  the number of updates. At the start of training the ramp goes from 0 to the scaled LR; after each
  growth it goes from the LR before the growth to the new scaled LR. Step decay multiplies both ends.
- `cap` (None = no cap) bounds the result.

Nothing here is stateful beyond configuration: the caller passes the controller's state, so the LR
after a restore or a resize is recomputed, never carried.

Schedules and growth scalings are registries of small classes (`--lr-schedule`, `--lr-scaling`
take their names): a new one is a class with a `name` and its one method, under
`@register_schedule` / `@register_scaling`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from hvd_abs.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from hvd_abs.batching.controller import BatchController


class Schedule:
    """The decay factor of an LR schedule at (0-based) `epoch` + `fraction` of it."""

    name = ""
    step_decay = False  # whether --lr-decay and --lr-decay-epochs apply

    def factor(self, s: "LRSchedule", epoch: int, fraction: float) -> float:
        raise NotImplementedError


class Scaling:
    """The LR multiplier for a global batch `ratio` times the initial one."""

    name = ""

    def scale(self, ratio: float) -> float:
        raise NotImplementedError


SCHEDULES: dict[str, Schedule] = {}
SCALINGS: dict[str, Scaling] = {}


def register_schedule(cls: type[Schedule]) -> type[Schedule]:
    SCHEDULES[cls.name] = cls()
    return cls


def register_scaling(cls: type[Scaling]) -> type[Scaling]:
    SCALINGS[cls.name] = cls()
    return cls


@register_schedule
class StepDecay(Schedule):
    """x decay at each of decay_epochs (the reference)."""

    name, step_decay = "step", True

    def factor(self, s: "LRSchedule", epoch: int, fraction: float) -> float:
        return s.decay ** sum(1 for d in s.decay_epochs if epoch >= d)


@register_schedule
class Cosine(Schedule):
    """(1 + cos(pi t / E)) / 2 over the run's E epochs, smooth within epochs."""

    name = "cosine"

    def factor(self, s: "LRSchedule", epoch: int, fraction: float) -> float:
        t = min(max(epoch + fraction, 0.0), s.total_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * t / s.total_epochs))


@register_scaling
class Linear(Scaling):
    name = "linear"  # x2 per doubling (the reference)

    def scale(self, ratio: float) -> float:
        return ratio


@register_scaling
class Sqrt(Scaling):
    name = "sqrt"

    def scale(self, ratio: float) -> float:
        return math.sqrt(ratio)


@register_scaling
class NoScaling(Scaling):
    name = "none"

    def scale(self, ratio: float) -> float:
        return 1.0



class LRSchedule:
    """LR schedule (defaults: lr 0.1, step decay 0.2 at `decay_epochs`, linear scaling, no
    warm-up/cap; `total_epochs` is used by the cosine schedule only)."""

    def __init__(self, base_lr: float = 0.1, decay: float = 0.2, decay_epochs: Sequence[int] = (30, 60),
                 scaling: str = "linear", warmup_epochs: float = 0.0, cap: float | None = None,
                 schedule: str = "step", total_epochs: int = 90) -> None:
        if not (base_lr > 0 and math.isfinite(base_lr)):
            raise UserError(f"--lr must be a positive number, got {base_lr}")
        if not (0 < decay <= 1):
            raise UserError(f"--lr-decay must be in (0, 1], got {decay}")
        if scaling not in SCALINGS:
            raise UserError(f"--lr-scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        if warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be >= 0, got {warmup_epochs}")
        if cap is not None and not cap > 0:
            raise UserError(f"--lr-cap must be > 0, got {cap}")
        if schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not total_epochs >= 1:
            raise UserError(f"--epochs must be >= 1, got {total_epochs}")
        self.base_lr = float(base_lr)
        self.decay = float(decay)
        self.decay_epochs = sorted(int(e) for e in decay_epochs)
        self.scaling = scaling
        self.warmup_epochs = float(warmup_epochs)
        self.cap = cap
        self.schedule = schedule
        self.total_epochs = int(total_epochs)

    def growth_scale(self, ratio: float) -> float:
        """LR multiplier for a global batch `ratio` times the initial one."""
        return SCALINGS[self.scaling].scale(ratio)

    def decay_factor(self, epoch: int, epoch_fraction: float = 0.0) -> float:
        """The schedule's factor at (0-based) `epoch` + `epoch_fraction`: the product of the step
        decays that apply, or the cosine's value."""
        return SCHEDULES[self.schedule].factor(self, epoch, epoch_fraction)

    def lr(self, epoch: int, epoch_fraction: float = 0.0, batch_ratio: float = 1.0,
           prev_batch_ratio: float | None = None, last_change_epoch: int = 0) -> float:
        """The LR at `epoch` + `epoch_fraction`.

        Args:
            batch_ratio: current global batch / initial batch.
            prev_batch_ratio: that ratio before the latest growth (None: no growth yet, so the
                warm-up, if any, starts from 0).
            last_change_epoch: epoch index at which the current batch size took effect
                (0 at the start).
        """
        target = self.base_lr * self.growth_scale(batch_ratio)
        if self.warmup_epochs > 0:
            progress = (epoch - last_change_epoch + epoch_fraction) / self.warmup_epochs
            if progress < 1:
                start = 0.0 if prev_batch_ratio is None else self.base_lr * self.growth_scale(prev_batch_ratio)
                target = start + (target - start) * max(progress, 0.0)
        lr = target * self.decay_factor(epoch, epoch_fraction)
        return min(lr, self.cap) if self.cap is not None else lr

    def state_dict(self) -> dict:
        """Configuration only (the LR itself is derived)."""
        return {"base_lr": self.base_lr, "decay": self.decay, "decay_epochs": list(self.decay_epochs),
                "scaling": self.scaling, "warmup_epochs": self.warmup_epochs, "cap": self.cap,
                "schedule": self.schedule, "total_epochs": self.total_epochs}

    def load_state_dict(self, state: dict) -> None:
        """Restore the configuration."""
        # (Checkpoints from before the cosine schedule: step decay.)
        self.__init__(state["base_lr"], state["decay"], state["decay_epochs"], state["scaling"],
                      state["warmup_epochs"], state["cap"], state.get("schedule", "step"),
                      state.get("total_epochs", self.total_epochs))

    def at(self, controller: "BatchController", epoch: int, epoch_fraction: float = 0.0) -> float:
        """The LR for a controller's current state (the usual call in the training loop)."""
        prev = None if controller.prev_batch is None else controller.prev_batch / controller.initial_batch
        return self.lr(epoch, epoch_fraction, controller.scale, prev, controller.change_epoch)
