"""A real 2-process Horovod run (Gloo on loopback) follows the 1-process run with accumulation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import horovodrun, run_checked
from hvd_abs.metrics import read_metrics

# Global batch 64, 64, 128, 256 (the first check only sets the reference; --duration 1 then grows at
# every check) with micro-batch 64: on 2 workers the first epochs have one idle rank (1 micro-batch),
# then 1 and 2 micro-batches per rank; 1 process accumulates 1, 1, 2, 4.
# cnn has BatchNorm: its running statistics (and so the eval-mode test loss and eigenvalue) follow
# the 1-process run only through hvd_abs/running_stats.py. (absa's FGSM runs in epochs 1-2 here,
# one micro-batch an update; FGSM within longer updates: test_train.py, test_fgsm_sees_...)
ARGS = ["-m", "hvd_abs", "train", "--dataset", "digits", "--model", "cnn", "--method", "absa",
        "--epochs", "4", "--base-batch", "64", "--batch", "64", "--max-batch", "256", "--duration", "1",
        "--eig-samples", "256", "--lr", "0.05", "--quiet", "--threads", "1",
        # Crops and flips drawn per sample, not per rank: the 2 workers still follow the 1 process.
        "--augment", "crop-flip"]


@pytest.mark.multiprocess
def test_two_workers_follow_the_one_process_batch_lr_and_loss_sequence(tmp_path: Path) -> None:
    one, two = tmp_path / "np1", tmp_path / "np2"
    run_checked([sys.executable, *ARGS, "--out", str(one)], timeout=120)
    run_checked(horovodrun(2, sys.executable, *ARGS, "--out", str(two)), timeout=180)
    e1, g1 = read_metrics(one)
    e2, g2 = read_metrics(two)
    assert [e["world_size"] for e in e2] == [2, 2, 2, 2]
    for key in ("global_batch", "updates", "samples_seen", "lr", "eig_samples"):
        assert [e[key] for e in e2] == [e[key] for e in e1], key
    assert [e["global_batch"] for e in e1] == [64, 64, 128, 256]
    assert [(e["accum_steps"], e2_["accum_steps"]) for e, e2_ in zip(e1, e2)] == [(1, 1), (1, 1), (2, 1), (4, 2)]
    growths = lambda events: [g["new_batch"] for g in events if g["event"] == "growth"]  # noqa: E731
    assert growths(g2) == growths(g1) == [128, 256]
    # Same samples, same math: the losses (a function of the weights) agree to float tolerance.
    for a, b in zip(e1, e2):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert (a["eig"] is None) == (b["eig"] is None)  # no estimate once at the cap
        if a["eig"] is not None:
            assert b["eig"] == pytest.approx(a["eig"], rel=1e-3)  # products summed over shards
