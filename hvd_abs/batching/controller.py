"""The ABS batch-size controller: when to double the global batch.

Rule (HessianFlow's ABSA, see shared notes): at every epoch end the top Hessian eigenvalue is
estimated. The first estimate becomes the reference `ref`. A later estimate with `eig <= ref / 2`
doubles the global batch and becomes the new reference (the estimate at the latest growth, not a
running maximum). After `duration` checks in a row without growth (not counting the check that set
the reference) the batch grows anyway, and that check's estimate becomes the reference. The batch
never exceeds `max_batch`; once there, `needs_estimate` is False and no more checks are spent.

That rule is the `hessian` trigger. Triggers are a registry of small classes (`--growth-trigger`
takes their names): a new one is a `GrowthTrigger` with a `name` and `check`, under
`@register_trigger`. `schedule` grows every `duration` checks and needs no eigenvalue. `gns`
grows when the epoch's gradient noise scale (noise_scale.py) is at least twice the batch,
with the same fallback.

All state lives in plain Python numbers (`state_dict`), independent of the world size.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from hvd_abs.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What one check decided. `reason` is what fired: "eig" or "gns" (the
    signal), "duration" (the fallback, or the schedule) or None (no growth). `ref` is the
    reference the estimate was compared against (None at the check that set the first one)."""

    grew: bool
    reason: str | None
    old_batch: int
    new_batch: int
    eig: float | None
    ref: float | None


class GrowthTrigger:
    """Whether a check grows the batch: `check` returns the reason (see Decision) or None,
    and may update the controller's `ref` and `checks_since_growth`."""

    name = ""
    needs_eig = True  # whether the check needs an eigenvalue estimate (the HVPs are skipped otherwise)
    needs_noise_scale = False  # whether the updates measure gradient norms for the noise scale

    def check(self, c: "BatchController", eig: float | None) -> str | None:
        raise NotImplementedError


TRIGGERS: dict[str, GrowthTrigger] = {}


# Earlier names, still read from checkpoints and configs written before the rename.
TRIGGER_ALIASES = {"eig": "hessian", "duration": "schedule"}


def register_trigger(cls: type[GrowthTrigger]) -> type[GrowthTrigger]:
    TRIGGERS[cls.name] = cls()
    return cls


def trigger_name(name: str) -> str:
    """The registered name of `name` (an alias's target, else `name` itself)."""
    return TRIGGER_ALIASES.get(name, name)


def _duration_passed(c: "BatchController") -> str | None:
    c.checks_since_growth += 1
    return "duration" if c.checks_since_growth >= c.duration else None


@register_trigger
class EigHalved(GrowthTrigger):
    """The paper's: the first estimate sets the reference; one at or below half of it grows."""

    name = "hessian"

    def check(self, c: "BatchController", eig: float | None) -> str | None:
        if c.ref is None:
            if eig is not None:
                c.ref = eig  # the first estimate sets the reference and never grows
            return None
        if eig is not None and eig <= c.ref / 2:
            return "eig"
        return _duration_passed(c)


@register_trigger
class Duration(GrowthTrigger):
    """Every `duration` checks: the fallback alone, the ablation of the Hessian signal."""

    name, needs_eig = "schedule", False

    def check(self, c: "BatchController", eig: float | None) -> str | None:
        return _duration_passed(c)


@register_trigger
class NoiseScale(GrowthTrigger):
    """McCandlish et al.'s critical batch: grow once B_noise >= 2 x the batch, the doubled batch
    still at most the noise scale; the fallback as for `hessian`."""

    name, needs_eig, needs_noise_scale = "gns", False, True

    def check(self, c: "BatchController", eig: float | None) -> str | None:
        if c.noise_scale is not None and c.noise_scale >= c.factor * c.global_batch:
            return "gns"
        return _duration_passed(c)


class BatchController:
    """Doubles the global batch on a flatter curvature; see the module docstring.

    Args:
        initial_batch: global batch at the start (`--batch`, default 128).
        max_batch: cap (`--max-batch`, default 16384).
        duration: checks without growth before growing anyway (`--duration`, default 10).
        factor: growth factor (2, as the reference).
        trigger: the name of a registered GrowthTrigger (`--growth-trigger`, default hessian).
    """

    def __init__(self, initial_batch: int = 128, max_batch: int = 16384, duration: int = 10,
                 factor: int = 2, trigger: str = "hessian") -> None:
        if initial_batch <= 0:
            raise UserError(f"--batch must be >= 1, got {initial_batch}")
        if max_batch < initial_batch:
            raise UserError(f"--max-batch ({max_batch}) is below --batch ({initial_batch}): raise --max-batch")
        if duration <= 0:
            raise UserError(f"--duration must be >= 1, got {duration}")
        if factor < 2:
            raise UserError(f"the growth factor must be >= 2, got {factor}")
        trigger = trigger_name(trigger)
        if trigger not in TRIGGERS:
            raise UserError(f"--growth-trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}")
        self.trigger = trigger
        self.initial_batch = initial_batch
        self.max_batch = max_batch
        self.duration = duration
        self.factor = factor
        self.global_batch = initial_batch
        self.ref: float | None = None
        self.checks_since_growth = 0
        self.num_growths = 0
        self.num_checks = 0
        self.prev_batch: int | None = None  # the batch before the latest growth (LR warm-up start)
        self.change_epoch = 0  # epoch index from which the current batch applies
        self.noise_scale: float | None = None  # the epoch's B_noise, fed to check() (not state)

    # --- queries -------------------------------------------------------------------------------
    @property
    def at_max(self) -> bool:
        """True once the global batch reached `max_batch`: no more growth, no more checks."""
        return self.global_batch >= self.max_batch

    @property
    def needs_estimate(self) -> bool:
        """Whether the next epoch end needs an eigenvalue (False at the cap: nothing to decide)."""
        return not self.at_max and TRIGGERS[self.trigger].needs_eig

    @property
    def needs_noise_scale(self) -> bool:
        """Whether the updates should measure gradient norms for the next check."""
        return not self.at_max and TRIGGERS[self.trigger].needs_noise_scale

    @property
    def scale(self) -> float:
        """Global batch relative to the initial one (2 ** doublings unless capped oddly)."""
        return self.global_batch / self.initial_batch

    # --- the rule ------------------------------------------------------------------------------
    def check(self, eig: float | None, epoch: int = 0, noise_scale: float | None = None) -> Decision:
        """Feed the estimate made at the end of (0-based) `epoch` (and, for `gns`, the epoch's
        noise scale); grow if the rule says so.

        A growth applies from epoch `epoch + 1`. `eig` None (no estimate) still counts as a check
        without growth, so the duration fallback cannot be starved.
        """
        self.noise_scale = noise_scale
        old = self.global_batch
        if self.at_max:
            return Decision(False, None, old, old, eig, self.ref)
        if eig is not None and not math.isfinite(eig):
            log.warning("non-finite eigenvalue estimate %r ignored by the batch controller", eig)
            eig = None
        self.num_checks += 1
        compared_to = self.ref
        reason = TRIGGERS[self.trigger].check(self, eig)
        if reason is None:
            return Decision(False, None, old, old, eig, compared_to)
        self.global_batch = min(old * self.factor, self.max_batch)
        self.prev_batch = old
        self.change_epoch = epoch + 1
        self.num_growths += 1
        self.checks_since_growth = 0
        if eig is not None:
            self.ref = eig
        log.info("batch grows %d -> %d (%s, eig=%s)", old, self.global_batch, reason, eig)
        return Decision(True, reason, old, self.global_batch, eig, compared_to)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything, as plain numbers: config and progress."""
        return {"initial_batch": self.initial_batch, "max_batch": self.max_batch,
                "duration": self.duration, "factor": self.factor, "trigger": self.trigger,
                "global_batch": self.global_batch,
                "ref": self.ref, "checks_since_growth": self.checks_since_growth,
                "num_growths": self.num_growths, "num_checks": self.num_checks,
                "prev_batch": self.prev_batch, "change_epoch": self.change_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output (config included)."""
        for key in ("initial_batch", "max_batch", "duration", "factor", "global_batch",
                    "checks_since_growth", "num_growths", "num_checks", "change_epoch"):
            setattr(self, key, int(state[key]))
        self.trigger = trigger_name(state.get("trigger", "hessian"))  # (none before triggers: the paper's)
        self.ref = None if state["ref"] is None else float(state["ref"])
        self.prev_batch = None if state["prev_batch"] is None else int(state["prev_batch"])
