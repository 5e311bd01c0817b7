"""--optimizer sgd|adamw|lars|lamb: each trains, resumes as if never stopped (its state in the
checkpoint), follows the growth LR rule, and gives the same run on 2 Horovod workers as on one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import horovodrun, run_checked
from hvd_abs.cli import main
from hvd_abs.metrics import read_metrics
from hvd_abs.training import TrainConfig, train
from hvd_abs.training.checkpoint import load_latest

LR = {"adamw": 0.003, "lars": 0.5, "lamb": 0.01}
# (the per-optimizer state that must survive a checkpoint)
STATE = {"adamw": "exp_avg_sq", "lars": "momentum_buffer", "lamb": "exp_avg_sq"}
TIMED = ("epoch_s", "samples_per_s", "second_order_s")


@pytest.fixture(scope="module")
def digits():
    from hvd_abs.data import load_dataset

    return load_dataset("digits")


def _untimed(run: Path) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMED} for e in read_metrics(run)[0]]


@pytest.mark.parametrize("name", sorted(LR))
def test_each_optimizer_learns_grows_and_resumes_as_if_never_stopped(digits, tmp_path: Path, name: str) -> None:
    # The schedule trigger doubles the batch after epochs 1 and 2: the LR doubles with it (linear).
    common = dict(method="abs", growth_trigger="schedule", duration=1, model="mlp", optimizer=name, lr=LR[name],
                  epochs=4, base_batch=32, max_batch=128, weight_decay=1e-4, lr_decay=1.0, quiet=True, threads=1)
    whole = train(TrainConfig(**common, out=str(tmp_path / "whole")), plot=False)
    epochs = read_metrics(tmp_path / "whole")[0]
    assert [e["global_batch"] for e in epochs] == [32, 64, 128, 128]
    assert [e["lr"] / LR[name] for e in epochs] == pytest.approx([1, 2, 4, 4])
    assert epochs[-1]["train_loss"] < 0.6 * epochs[0]["train_loss"] and whole["final_test_acc"] > 0.8

    train(TrainConfig(**common, stop_at_update=50, out=str(tmp_path / "cut")), plot=False)  # mid-epoch 2
    _, state = load_latest(tmp_path / "cut" / "checkpoints")
    assert all(STATE[name] in s for s in state["optimizer"]["state"].values())
    resumed = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(tmp_path / "cut")])
    assert resumed.exit_code == 0, resumed.output
    assert _untimed(tmp_path / "cut") == _untimed(tmp_path / "whole")


def test_an_optimizer_option_that_does_not_apply_is_one_line() -> None:
    result = CliRunner().invoke(main, ["train", "--optimizer", "adamw", "--nesterov", "--out", "unused"])
    assert result.exit_code == 2 and "--nesterov is for sgd and lars" in result.output
    assert len(result.output.strip().splitlines()) == 1
    bad = CliRunner().invoke(main, ["train", "--optimizer", "adam"])
    assert bad.exit_code == 2 and "'adam' is not one of 'sgd', 'adamw', 'lars', 'lamb'" in bad.output


ARGS = ["-m", "hvd_abs", "train", "--dataset", "digits", "--model", "cnn", "--method", "abs", "--growth-trigger",
        "schedule", "--duration", "1", "--epochs", "3", "--base-batch", "32", "--batch", "64", "--max-batch", "256",
        "--optimizer", "lamb", "--precision", "fp16", "--lr", "0.01", "--lr-decay", "1", "--weight-decay", "0.01", "--quiet", "--threads", "1"]


@pytest.mark.multiprocess
def test_lamb_and_fp16_on_two_workers_follow_the_one_process_run(tmp_path: Path) -> None:
    """LAMB's trust ratio is per layer of the summed gradient, and fp16's unscaling and overflow
    check are of it too: the same on 2 workers as on one."""
    one, two = tmp_path / "np1", tmp_path / "np2"
    run_checked([sys.executable, *ARGS, "--out", str(one)], timeout=120)
    run_checked(horovodrun(2, sys.executable, *ARGS, "--out", str(two)), timeout=180)
    e1, e2 = read_metrics(one)[0], read_metrics(two)[0]
    assert [e["world_size"] for e in e2] == [2, 2, 2]
    for key in ("global_batch", "updates", "lr"):
        assert [e[key] for e in e2] == [e[key] for e in e1], key
    # (float16 forward passes round the weights anew each update: the summation order's 1e-7
    # differences become 1e-4 ones; a rank stepping on its own, or skipping alone, would be far off)
    for a, b in zip(e1, e2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=3e-3)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=3e-3)
    w1, w2 = torch.load(one / "model.pt", weights_only=True), torch.load(two / "model.pt", weights_only=True)
    # (Adam-style steps normalise by sqrt(v): single weights move by more, so each tensor is compared whole)
    for k, a in w1.items():
        a, b = a.double(), w2[k].double()
        assert (a - b).norm() <= 1e-2 * a.norm(), k
