"""The gns growth trigger: McCandlish et al.'s noise-scale estimate, measured from the update's
own gradients (micro-batch 0 against the global batch), the same on 1 and 2 workers."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import horovodrun, run_checked
from hvd_abs.batching.controller import BatchController
from hvd_abs.batching.noise_scale import noise_scale
from hvd_abs.errors import UserError
from hvd_abs.metrics import read_metrics
from hvd_abs.training import TrainConfig


def test_the_estimate_recovers_a_known_noise_scale():
    """Per-sample gradients G + noise of covariance Sigma: batches of 8 and 64 drawn many times;
    the estimate is tr(Sigma) / |G|^2 = 40 / 4 = 10 within sampling error."""
    gen = torch.Generator().manual_seed(0)
    d, G = 40, torch.full((40,), 2.0 / math.sqrt(40))  # |G|^2 = 4, tr(Sigma) = 40 (unit noise)

    def batch_sq(b: int, draws: int) -> float:
        means = G + torch.randn(draws, b, d, generator=gen).mean(1)
        return float(means.square().sum(1).mean())

    est = noise_scale(batch_sq(8, 4000), batch_sq(64, 4000), 8, 64)
    assert est == pytest.approx(10.0, rel=0.1)
    assert noise_scale(1.0, 1.0, 64, 64) is None  # one batch size: nothing to compare
    assert noise_scale(5.0, 1.0, 8, 64) > 0 and noise_scale(1.0, -1.0, 8, 64) == math.inf


def test_the_trigger_grows_at_twice_the_batch_else_falls_back():
    c = BatchController(initial_batch=64, max_batch=512, duration=2, trigger="gns")
    assert not c.needs_estimate and c.needs_noise_scale  # no Hessian products for it
    assert not c.check(None, 0, noise_scale=100.0).grew  # below 2 x 64
    d = c.check(None, 1, noise_scale=130.0)
    assert d.grew and d.reason == "gns" and c.global_batch == 128
    assert not c.check(None, 2, noise_scale=None).grew
    assert c.check(None, 3, noise_scale=None).reason == "duration"  # the fallback, as for eig


def test_gns_needs_two_micro_batches_to_compare():
    with pytest.raises(UserError, match=r"needs --batch at least 2 x --base-batch \(128\)"):
        TrainConfig(method="abs", growth_trigger="gns", base_batch=64, batch=64, out="unused").validate()


ARGS = ["-m", "hvd_abs", "train", "--dataset", "digits", "--model", "cnn", "--method", "abs", "--growth-trigger",
        "gns", "--epochs", "4", "--base-batch", "16", "--batch", "32", "--max-batch", "256", "--duration", "3",
        "--lr", "0.05", "--quiet", "--threads", "1"]


@pytest.mark.multiprocess
def test_two_workers_measure_the_noise_scale_of_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "np1", tmp_path / "np2"
    run_checked([sys.executable, *ARGS, "--out", str(one)], timeout=120)
    run_checked(horovodrun(2, sys.executable, *ARGS, "--out", str(two)), timeout=180)
    (e1, g1), (e2, g2) = read_metrics(one), read_metrics(two)
    grown = lambda events: [(g["epoch"], g["reason"], g["new_batch"]) for g in events if g["event"] == "growth"]  # noqa: E731
    assert grown(g1) == grown(g2) and grown(g1), g1
    assert any(r == "gns" for _, r, _ in grown(g1)), g1  # the signal, not only the fallback, grew it here
    for a, b in zip((g for g in g1 if g["event"] == "growth"), (g for g in g2 if g["event"] == "growth")):
        assert (a["noise_scale"] is None) == (b["noise_scale"] is None)  # (null: inf, noise swamps the signal)
        if a["noise_scale"] is not None:
            assert b["noise_scale"] == pytest.approx(a["noise_scale"], rel=1e-3)
    assert [e["global_batch"] for e in e1] == [e["global_batch"] for e in e2]
