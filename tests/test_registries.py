"""The settings' declaration and the registries: every option of `hvd-abs train` comes from
TrainConfig's fields (help and group included), and an LR schedule or a growth trigger is one
class and its registration, which the CLI and the run then take as their own."""
from __future__ import annotations

import dataclasses
import math

import pytest
from click.testing import CliRunner

from hvd_abs.batching import controller as ctl
from hvd_abs.batching import lr
from hvd_abs.cli import main
from hvd_abs.metrics import read_metrics
from hvd_abs.training import TrainConfig, train
from hvd_abs.training.options import GROUPS, train_options


@pytest.fixture(scope="module")
def digits():
    from hvd_abs.data import load_dataset

    return load_dataset("digits")


def test_every_field_is_an_option_with_a_help_text_under_a_group() -> None:
    from hvd_abs.training.config_file import COMMAND_LINE_ONLY

    options = {o.name: o for o in train_options() if o.name not in COMMAND_LINE_ONLY}  # (--config, --print-config)
    assert set(options) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, o in options.items():
        assert o.help and o.group in GROUPS, name
        assert o.default == TrainConfig.__dataclass_fields__[name].default, name
    assert options["lr_schedule"].type.choices == tuple(lr.SCHEDULES)
    assert options["growth_trigger"].type.choices == tuple(ctl.TRIGGERS)


def test_help_lists_the_options_under_their_groups() -> None:
    out = CliRunner().invoke(main, ["train", "--help"]).output
    headings = [f"{g.capitalize()} options:" for g in GROUPS]
    assert [h for h in headings if h in out] == headings
    assert out.index("--eig-samples") > out.index("Second order options:") > out.index("--lr-schedule")
    assert "--stop-at-update" not in out  # (hidden: restart benchmarks only)


@pytest.fixture
def warm_restarts():
    """A new LR schedule, as a user adds one: a class and its registration."""
    @lr.register_schedule
    class WarmRestarts(lr.Schedule):
        name = "restarts"  # halves every epoch, back to 1 every 2 epochs

        def factor(self, s, epoch, fraction):
            return 0.5 ** (epoch % 2)

    yield WarmRestarts
    del lr.SCHEDULES["restarts"]


def test_a_registered_schedule_is_a_choice_of_the_cli_and_runs(digits, tmp_path, warm_restarts) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--method", "sgd", "--model", "mlp", "--epochs", "3", "--lr", "0.2",
                                       "--lr-schedule", "restarts", "--quiet", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [e["lr"] for e in read_metrics(out)[0]] == pytest.approx([0.2, 0.1, 0.2])
    # Without the registration it is refused in one line, like any bad value.
    del lr.SCHEDULES["restarts"]
    try:
        bad = CliRunner().invoke(main, ["train", "--lr-schedule", "restarts", "--out", str(tmp_path / "x")])
    finally:
        lr.SCHEDULES["restarts"] = warm_restarts()
    assert bad.exit_code == 2 and "restarts" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_the_schedule_trigger_grows_every_duration_without_a_hessian(digits, tmp_path) -> None:
    calls = []

    def eigen_fn(*args, **kwargs):  # (counts estimates: the schedule trigger must ask for none)
        calls.append(1)
        raise AssertionError("no estimate should be made")

    cfg = TrainConfig(method="abs", model="mlp", epochs=5, batch=128, max_batch=1024, duration=2,
                      growth_trigger="schedule", quiet=True, threads=1, out=str(tmp_path / "run"))
    summary = train(cfg, data=digits, eigen_fn=eigen_fn, plot=False)
    epochs, _ = read_metrics(tmp_path / "run")
    assert not calls and all(e["eig"] is None for e in epochs)
    assert [(g["epoch"], g["new_batch"], g["reason"]) for g in summary["growths"]] == [(2, 256, "duration"),
                                                                                         (4, 512, "duration")]


def test_a_trigger_is_one_class_and_its_registration() -> None:
    @ctl.register_trigger
    class Always(ctl.GrowthTrigger):
        name, needs_eig = "always", False

        def check(self, c, eig):
            return "always"

    try:
        c = ctl.BatchController(128, 512, duration=10, trigger="always")
        assert not c.needs_estimate
        assert [c.check(None, e).new_batch for e in range(3)] == [256, 512, 512]
        restored = ctl.BatchController(128, 512)
        restored.load_state_dict(c.state_dict())
        assert restored.trigger == "always" and restored.global_batch == 512
    finally:
        del ctl.TRIGGERS["always"]
    with pytest.raises(Exception, match="--growth-trigger must be one of hessian, schedule, gns"):
        ctl.BatchController(128, 512, trigger="always")
    assert math.isclose(lr.SCALINGS["sqrt"].scale(4.0), 2.0)


def test_the_earlier_trigger_names_still_read() -> None:
    """eig and duration (the names before hessian and schedule) in a config or a checkpoint."""
    cfg = TrainConfig(method="abs", growth_trigger="duration", out="unused")
    cfg.validate()
    assert cfg.growth_trigger == "schedule"
    old = ctl.BatchController(128, 512, trigger="hessian").state_dict()
    restored = ctl.BatchController(128, 512, trigger="schedule")
    restored.load_state_dict({**old, "trigger": "eig"})
    assert restored.trigger == "hessian" and restored.needs_estimate
