"""The batch controller, the LR schedule and the layout of a global batch."""
from __future__ import annotations

import pytest

from hvd_abs.batching import BatchController, LRSchedule, layout, plan, wanted_world_size
from hvd_abs.errors import UserError


def test_first_estimate_sets_reference_and_never_grows() -> None:
    c = BatchController(128, 16384, duration=10)
    d = c.check(100.0, epoch=0)
    assert not d.grew and c.ref == 100.0 and c.global_batch == 128
    assert d.ref is None                       # nothing to compare against yet


def test_trigger_is_half_of_reference_then_reference_moves_to_growth_estimate() -> None:
    c = BatchController(128, 16384, duration=10)
    c.check(100.0)
    assert not c.check(50.1).grew              # just above ref / 2
    d = c.check(50.0)                          # eig <= ref / 2
    assert d.grew and d.reason == "eig" and c.global_batch == 256 and c.ref == 50.0
    assert d.ref == 100.0                      # the decision names what 50 was compared against
    assert not c.check(30.0).grew              # 30 > 50 / 2: the ref is the growth's estimate, not 100
    assert c.check(25.0).grew and c.global_batch == 512


def test_reference_is_not_a_running_max() -> None:
    c = BatchController(128, 16384)
    c.check(10.0)
    c.check(40.0)                              # sharper later: ref stays 10
    assert c.ref == 10.0 and c.check(5.0).grew


def test_duration_fallback_grows_after_n_checks_without_growth() -> None:
    c = BatchController(128, 16384, duration=3)
    c.check(10.0)                              # sets the ref, not counted
    assert not c.check(9.0).grew and not c.check(9.0).grew
    d = c.check(9.0, epoch=3)
    assert d.grew and d.reason == "duration" and c.ref == 9.0 and c.change_epoch == 4
    assert d.ref == 10.0
    assert c.checks_since_growth == 0


def test_cap_is_never_exceeded_and_stops_estimates() -> None:
    c = BatchController(128, 384, duration=1)
    c.check(1.0)
    assert c.check(1.0).new_batch == 256
    assert c.check(1.0).new_batch == 384      # min(2 G, cap)
    assert c.at_max and not c.needs_estimate
    assert not c.check(0.0).grew and c.global_batch == 384


def test_controller_state_round_trip() -> None:
    c = BatchController(64, 4096, duration=2)
    for e, v in enumerate([8.0, 7.0, 3.0, 2.9]):
        c.check(v, e)
    c2 = BatchController()
    c2.load_state_dict(c.state_dict())
    assert c2.state_dict() == c.state_dict()
    assert c2.check(1.0, 4) == c.check(1.0, 4)


def test_controller_rejects_bad_config() -> None:
    with pytest.raises(UserError, match="--max-batch"):
        BatchController(256, 128)
    with pytest.raises(UserError, match="--duration"):
        BatchController(128, 256, duration=0)


@pytest.mark.parametrize("scaling,expected", [("linear", 0.4), ("sqrt", 0.2), ("none", 0.1)])
def test_lr_scaling_per_doubling(scaling: str, expected: float) -> None:
    s = LRSchedule(0.1, 0.2, [30, 60], scaling)
    assert s.lr(0, batch_ratio=4.0) == pytest.approx(expected)


def test_lr_step_decay_and_cap() -> None:
    s = LRSchedule(0.1, 0.2, [30, 60], "linear", cap=0.5)
    assert s.lr(29) == pytest.approx(0.1)
    assert s.lr(30) == pytest.approx(0.02)
    assert s.lr(60, batch_ratio=8) == pytest.approx(0.1 * 8 * 0.04)
    assert s.lr(0, batch_ratio=16) == 0.5     # capped


def test_lr_warmup_ramps_from_previous_lr_after_growth() -> None:
    s = LRSchedule(0.1, 0.2, [], "linear", warmup_epochs=2)
    assert s.lr(0, 0.5) == pytest.approx(0.025)  # start: from 0 to 0.1 over 2 epochs
    assert s.lr(2, 0.0) == pytest.approx(0.1)
    # growth 1 -> 2 effective at epoch 5: from 0.1 to 0.2 over 2 epochs
    assert s.lr(5, 0.0, 2.0, 1.0, 5) == pytest.approx(0.1)
    assert s.lr(6, 0.0, 2.0, 1.0, 5) == pytest.approx(0.15)
    assert s.lr(7, 0.5, 2.0, 1.0, 5) == pytest.approx(0.2)


def test_lr_cosine_runs_from_the_lr_to_zero_over_the_run_within_epochs() -> None:
    import math

    s = LRSchedule(0.1, schedule="cosine", total_epochs=10, decay_epochs=[], warmup_epochs=1)
    assert s.lr(0, 0.5) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.05)) / 2)  # warm-up times cosine
    assert s.lr(5, 0.0) == pytest.approx(0.05) and s.lr(5, 0.0, batch_ratio=4) == pytest.approx(0.2)
    assert s.lr(7, 0.5) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.75)) / 2)  # smooth inside an epoch
    assert s.lr(9, 1.0) == pytest.approx(0.0, abs=1e-12) and s.lr(12) == pytest.approx(0.0, abs=1e-12)
    again = LRSchedule()
    again.load_state_dict(s.state_dict())
    assert again.lr(7, 0.5) == s.lr(7, 0.5)
    old = {k: v for k, v in LRSchedule(0.1, 0.5, [2]).state_dict().items() if k not in ("schedule", "total_epochs")}
    again.load_state_dict(old)  # a checkpoint from before the cosine schedule: step decay
    assert again.lr(2) == pytest.approx(0.05)
    with pytest.raises(UserError, match="--lr-schedule must be one of step, cosine"):
        LRSchedule(schedule="linear")


def test_lr_follows_controller_state_after_round_trip() -> None:
    s = LRSchedule(0.1, 0.2, [3], "linear")
    c = BatchController(128, 1024, duration=1)
    c.check(1.0, 0)
    c.check(1.0, 1)                               # grows to 256 for epoch 2
    c2 = BatchController()
    c2.load_state_dict(c.state_dict())
    assert s.at(c2, 2) == s.at(c, 2) == pytest.approx(0.2)
    assert s.at(c2, 3) == pytest.approx(0.04)
    s2 = LRSchedule()
    s2.load_state_dict(s.state_dict())
    assert s2.at(c2, 3) == s.at(c, 3)


@pytest.mark.parametrize("G,b,W,per,accum,active", [
    (128, 128, 1, 128, 1, 1), (512, 128, 1, 128, 4, 1), (512, 128, 2, 128, 2, 2),
    (512, 128, 3, 128, 2, 3), (128, 128, 4, 128, 1, 1), (64, 128, 2, 64, 1, 1), (192, 128, 1, 96, 2, 1)])
def test_layout_keeps_micro_batches_world_independent(G, b, W, per, accum, active) -> None:
    lay = layout(G, b, W)
    assert plan(G, b, W) == (per, accum)
    assert lay.active_workers == active
    assert sum(lay.micro_sizes()) == G and max(lay.micro_sizes()) - min(lay.micro_sizes()) <= 1
    assert layout(G, b, 1).micro_sizes() == lay.micro_sizes()  # same micro-batches at any W
    dealt = sorted(j for r in range(W) for j in lay.micro_ids_for(r))
    assert dealt == list(range(lay.num_micro))
    assert all(len(lay.micro_ids_for(r)) <= accum for r in range(W))


def test_wanted_world_size() -> None:
    assert wanted_world_size(128, 128, 4) == 1
    assert wanted_world_size(512, 128, 4) == 4
    assert wanted_world_size(8192, 128, 4) == 4
    assert wanted_world_size(64, 128, 4) == 1


def test_layout_rejects_non_positive_sizes() -> None:
    with pytest.raises(UserError, match="--base-batch"):
        layout(128, 0, 1)
    with pytest.raises(UserError, match="--batch"):
        layout(-1, 128, 1)
    # The smallest batch on more workers than it has samples: one worker, one sample, no accumulation.
    tiny = layout(1, 128, 8)
    assert (tiny.num_micro, tiny.active_workers, tiny.accum_steps, tiny.per_worker_batch) == (1, 1, 1, 1)
