"""The training loop on one process: exact accumulation, a real ABSA run, the CLI's bad input."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hvd_abs.cli import main
from hvd_abs.metrics import EPOCH_FIELDS, read_metrics
from hvd_abs.errors import UserError
from hvd_abs.training import TrainConfig, Trainer, train


@pytest.fixture(scope="module")
def digits():
    from hvd_abs.data import load_dataset

    return load_dataset("digits")


def _one_update(digits, tmp_path: Path, base_batch: int) -> list[torch.Tensor]:
    cfg = TrainConfig(method="sgd", model="mlp", epochs=2, batch=512, base_batch=base_batch, lr=0.5,
                      out=str(tmp_path / f"b{base_batch}"), quiet=True, seed=11)
    trainer = Trainer(cfg, data=digits)
    assert trainer.step()
    # Momentum buffers must agree too: they carry the update into the next step.
    assert trainer.step()
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_sgd_accumulation_4x128_equals_one_512_batch(digits, tmp_path: Path) -> None:
    accumulated = _one_update(digits, tmp_path, base_batch=128)  # 4 micro-batches of 128
    whole = _one_update(digits, tmp_path, base_batch=512)        # 1 batch of 512
    for a, w in zip(accumulated, whole):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


class _CountOps:
    """Counts the aten ops dispatched inside `with` (forward, backward and optimizer alike)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.n += 1
                return func(*args, **(kwargs or {}))

        self.n, self._mode = 0, Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def test_an_update_dispatches_about_what_the_textbook_loop_does(digits, tmp_path: Path) -> None:
    # A small model's update on a GPU is launch-bound, so every extra op is time. The trainer
    # used to zero the gradients instead of dropping them: 567 ops against 492 (+15%).
    import torch.nn.functional as F

    cfg = TrainConfig(method="sgd", model="resnet20", epochs=2, batch=32, base_batch=32, lr=0.1,
                      out=str(tmp_path / "t"), quiet=True)
    trainer = Trainer(cfg, data=digits)
    model = copy.deepcopy(trainer.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    idx = torch.arange(32)

    def textbook() -> None:
        model.train()
        opt.zero_grad()
        x, y = digits.train_x[idx], digits.train_y[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        _ = (loss.item(), (logits.argmax(1) == y).sum().item())  # what a loop logs

    trainer.step(), textbook()  # the first update creates the momentum buffers
    with _CountOps() as plain:
        textbook()
    with _CountOps() as ours:
        assert trainer.step()
    assert plain.n > 300  # forward, backward and optimizer were all counted
    assert ours.n <= 1.05 * plain.n, (ours.n, plain.n)


def test_label_smoothing_and_nesterov_update_as_torch_does(digits, tmp_path: Path) -> None:
    import torch.nn.functional as F

    cfg = TrainConfig(method="sgd", model="mlp", epochs=2, batch=96, base_batch=32, lr=0.3, nesterov=True,
                      label_smoothing=0.1, out=str(tmp_path / "t"), quiet=True)
    trainer = Trainer(cfg, data=digits)
    model = copy.deepcopy(trainer.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, nesterov=True)
    perm = trainer.sampler.permutation()
    for step in range(2):  # (the second update uses the momentum the first one left)
        idx = perm[step * 96:(step + 1) * 96]
        opt.zero_grad()
        F.cross_entropy(model(digits.train_x[idx]), digits.train_y[idx], label_smoothing=0.1).backward()
        opt.step()
        assert trainer.step()
    for a, b in zip(trainer.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="--nesterov needs momentum"):
        TrainConfig(nesterov=True, momentum=0.0, out=str(tmp_path / "n")).validate()
    with pytest.raises(UserError, match=r"--label-smoothing must be in \[0, 1\)"):
        TrainConfig(label_smoothing=1.0, out=str(tmp_path / "n")).validate()


def test_fgsm_sees_the_batchnorm_statistics_of_the_updates_start(digits, tmp_path: Path) -> None:
    """ABSA's FGSM runs in eval mode, on the running statistics. Within an update one process has
    every earlier micro-batch's updates, a worker only its own: on the statistics of the update's
    start, which all hold, the inputs are the same on any world size."""
    from hvd_abs.running_stats import running_buffers

    t = Trainer(TrainConfig(method="absa", model="cnn", epochs=2, batch=96, base_batch=32, quiet=True, threads=1,
                            out=str(tmp_path / "r")), data=digits)
    buffers = running_buffers(t.model)
    seen, apply = [], t.adv.apply

    def recording(*args, **kwargs):
        seen.append([b.clone() for b in buffers])
        return apply(*args, **kwargs)

    t.adv.apply = recording
    for _ in range(2):
        start = [b.clone() for b in buffers]
        seen.clear()
        assert t.step()
        assert len(seen) == 3  # one per micro-batch of 32
        for stats in seen:
            assert all(torch.equal(a, b) for a, b in zip(stats, start))
        assert not all(torch.equal(a, b) for a, b in zip(buffers, start))  # (and the update moved them)


def test_clip_grad_norm_clips_the_global_batch_as_torch_does(digits, tmp_path: Path) -> None:
    """--clip-grad-norm: the update equals torch's clip_grad_norm_ on the whole batch's gradient,
    with 3 micro-batches accumulated (the clip must come after the sum, not per micro-batch)."""
    import torch.nn.functional as F

    cfg = TrainConfig(method="sgd", model="mlp", epochs=2, batch=96, base_batch=32, lr=0.3, clip_grad_norm=0.05,
                      out=str(tmp_path / "t"), quiet=True)
    trainer = Trainer(cfg, data=digits)
    model = copy.deepcopy(trainer.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    perm = trainer.sampler.permutation()
    for step in range(2):
        idx = perm[step * 96:(step + 1) * 96]
        opt.zero_grad()
        F.cross_entropy(model(digits.train_x[idx]), digits.train_y[idx]).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert norm > 0.2, norm  # the clip is at work: a quarter of the norm or less is kept
        opt.step()
        assert trainer.step()
    for a, b in zip(trainer.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(UserError, match="--clip-grad-norm must be a finite number > 0"):
            TrainConfig(clip_grad_norm=bad, out=str(tmp_path / "n")).validate()


def test_trainer_state_round_trip_continues_identically(digits, tmp_path: Path) -> None:
    import types

    fake = lambda *a, **k: types.SimpleNamespace(eigenvalues=[1.0], num_hvps=1, converged=True)  # noqa: E731
    cfg = TrainConfig(method="absa", model="mlp", epochs=3, base_batch=64, out=str(tmp_path / "a"), quiet=True)
    t1 = Trainer(cfg, data=digits, eigen_fn=fake)
    for _ in range(3):
        assert t1.step()
    state = copy.deepcopy(t1.state_dict())  # like torch's, the state holds references
    t2 = Trainer(TrainConfig(**{**cfg.__dict__, "seed": 99}), data=digits, eigen_fn=fake)
    t2.load_state_dict(state)
    assert t1.step() and t2.step()
    for a, b in zip(t1.model.parameters(), t2.model.parameters()):
        assert torch.equal(a, b)
    assert t1.current_lr() == t2.current_lr() and t1.sampler.position == t2.sampler.position


def test_the_eigenvalue_samples_are_drawn_per_epoch_and_capped_at_the_training_set(digits, tmp_path, caplog) -> None:
    import logging

    n = int(digits.train_y.shape[0])
    cfg = TrainConfig(method="abs", model="mlp", epochs=3, eig_samples=n + 500, out=str(tmp_path / "a"), quiet=True)
    t = Trainer(cfg, data=digits)
    with caplog.at_level(logging.WARNING, logger="hvd_abs.training.curvature"):
        first = t.eig_batches()
        t.eig_batches()
    assert caplog.text.count(f"--eig-samples {n + 500} exceeds the {n} training samples") == 1  # once a run
    assert sum(int(y.numel()) for _, y in first) == n and max(int(y.numel()) for _, y in first) == 128
    some = Trainer(TrainConfig(**{**cfg.__dict__, "eig_samples": 256}), data=digits).curvature
    once, again, next_epoch = some.batches(0), some.batches(0), some.batches(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(once, again))  # a function of (seed, epoch)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(once, next_epoch))


def test_real_absa_run_on_digits_grows_the_batch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--dataset", "digits", "--method", "absa", "--model", "mlp", "--epochs", "4",
        "--base-batch", "32", "--duration", "1", "--max-batch", "256", "--eig-samples", "256",
        "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    epochs, events = read_metrics(out)
    assert len(epochs) == 4 and all(tuple(e) == EPOCH_FIELDS for e in epochs)
    growths = [e for e in events if e["event"] == "growth"]
    assert growths and epochs[-1]["global_batch"] > epochs[0]["global_batch"]
    assert all(e["eig"] is not None and e["eig"] > 0 for e in epochs[:2])
    assert epochs[0]["adv_ratio"] == 0.2 and epochs[-1]["adv_ratio"] == 0.0
    assert all(0 <= e["test_acc"] <= 1 for e in epochs) and epochs[-1]["test_acc"] > 0.8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_growths"] == len(growths) and (out / "plots.png").stat().st_size > 0
    assert "plot:" in result.output
    # `hvd-abs plot` redraws from metrics.jsonl alone
    (out / "plots.png").unlink()
    redraw = CliRunner().invoke(main, ["plot", str(out)])
    assert redraw.exit_code == 0 and (out / "plots.png").exists()


BAD = {
    "zero epochs": ["--epochs", "0"],
    "negative base batch": ["--base-batch", "-4"],
    "zero batch": ["--batch", "0"],
    "max below base": ["--max-batch", "64", "--base-batch", "128"],
    "max below batch": ["--batch", "512", "--max-batch", "256"],
    "zero duration": ["--duration", "0"],
    "negative lr": ["--lr", "-0.1"],
    "decay epoch out of range": ["--epochs", "5", "--lr-decay-epochs", "3,9"],
    "decay factor": ["--lr-decay", "1.5"],
    "negative eps": ["--adv-eps", "-0.01"],
    "adv ratio above 1": ["--adv-ratio", "1.2"],
    "adv ratio negative": ["--adv-ratio", "-0.2"],
    "zero eig samples": ["--eig-samples", "0"],
    "unknown model": ["--model", "nope"],
    "unknown dataset": ["--dataset", "nope"],
    "missing data dir": ["--dataset", "imagefolder", "--data-dir", "/nonexistent/data"],
    "negative weight decay": ["--weight-decay", "-1"],
    "zero threads": ["--threads", "0"],
    "lr that overflows": ["--lr", "1e300"],
    "infinite weight decay": ["--weight-decay", "inf"],
    "infinite warm-up": ["--warmup-epochs", "inf"],
    "batch above the data": ["--batch", "4096", "--max-batch", "4096"],
    "empty out": ["--out", ""],
}


def test_decay_epochs_outside_the_run_name_the_valid_range(tmp_path: Path) -> None:
    for epochs, decay, fix in (("5", "3,9", "give epochs from 1 to 4"), ("1", "5", "leave --lr-decay-epochs out")):
        result = CliRunner().invoke(main, ["train", "--epochs", epochs, "--lr-decay-epochs", decay,
                                           "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and fix in result.output, result.output


@pytest.mark.parametrize("args", BAD.values(), ids=BAD.keys())
def test_bad_input_one_line_exit_2_out_dir_untouched(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["train", "--epochs", "2", "--out", str(out), "--quiet", *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_out_dir_with_another_run_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--quiet", "--epochs", "1"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_a_file_where_the_run_keeps_a_folder_is_refused_before_training(tmp_path: Path) -> None:
    """A file named checkpoints in --out was found only by the first checkpoint, after the whole
    training (a traceback, and no weights). A folder named like a checkpoint is no checkpoint."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("x")
    result = CliRunner().invoke(main, ["train", "--dataset", "digits", "--method", "sgd", "--out", str(out),
                                       "--quiet", "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert f"{out / 'checkpoints'} is a file, but a run keeps its checkpoints in a folder" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    (tmp_path / "r" / "checkpoints" / "ckpt-000099.pt").mkdir(parents=True)
    result = CliRunner().invoke(main, ["train", "--dataset", "digits", "--quiet", "--resume", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no checkpoint there verifies" in result.output, result.output


def test_decay_epochs_of_the_wrong_type_are_refused_not_misread(tmp_path: Path) -> None:
    """From Python, lr_decay_epochs="12" was read a character at a time (decays at epochs 1 and 2)."""
    for value in ("12", "1,2", [], [1.5], [True]):
        with pytest.raises(UserError, match=r"--lr-decay-epochs must be a non-empty list of whole epochs"):
            TrainConfig(epochs=3, lr_decay_epochs=value, out=str(tmp_path / "x")).validate()
    TrainConfig(epochs=3, lr_decay_epochs=(1, 2), out=str(tmp_path / "x")).validate()


def test_resume_continues_the_run_as_it_was_started(tmp_path: Path) -> None:
    # Only --epochs given: method, micro-batch, batch and LR come from the run, not the defaults
    # (absa, 128): the resumed epochs keep 2 micro-batches of 32 and the summary says sgd.
    first = tmp_path / "first"
    start = ["train", "--quiet", "--method", "sgd", "--base-batch", "32", "--batch", "64", "--lr", "0.01",
             "--model", "mlp", "--epochs", "1", "--out", str(first)]
    assert CliRunner().invoke(main, start).exit_code == 0
    result = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(first), "--epochs", "2",
                                       "--out", str(tmp_path / "second")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert (summary["method"], summary["config"]["base_batch"], summary["config"]["lr"]) == ("sgd", 32, 0.01)
    epochs, _ = read_metrics(tmp_path / "second")
    assert [(e["epoch"], e["global_batch"], e["accum_steps"], e["eig"]) for e in epochs] == [(1, 64, 2, None), (2, 64, 2, None)]
    # --epochs too is the run's own unless given: a plain --resume of a run stopped early runs to
    # its planned end (not to the default 90 epochs), and one of a finished run is refused.
    stopped = tmp_path / "stopped"
    assert CliRunner().invoke(main, [*start[:-4], "--epochs", "3", "--stop-at-update", "30", "--checkpoint-every",
                                     "1", "--test-subset", "100", "--out", str(stopped)]).exit_code == 0
    result = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(stopped)])
    assert result.exit_code == 0, result.output
    assert [e["epoch"] for e in read_metrics(stopped)[0]] == [1, 2, 3]
    config = json.loads((stopped / "summary.json").read_text())["config"]  # and the run's other kept options
    assert (config["checkpoint_every"], config["test_subset"]) == (1, 100)
    result = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(stopped)])
    assert result.exit_code == 2 and "already reached epoch 3; pass --epochs above 3" in result.output
    # Options given with the value the run had in effect change nothing: a digits run with
    # --model auto trained cnn, and without --batch its batch was --base-batch (128).
    auto = tmp_path / "auto"
    assert CliRunner().invoke(main, ["train", "--quiet", "--method", "sgd", "--epochs", "1", "--out", str(auto)]
                              ).exit_code == 0
    # One that differs is named, not the ones that follow from it (--batch, left out, is --base-batch).
    result = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(auto), "--epochs", "3", "--base-batch", "64"])
    assert result.exit_code == 2 and "--base-batch 64 (the run has 128): these define" in result.output, result.output
    result = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(auto), "--epochs", "2", "--model", "cnn",
                                       "--batch", "128"])
    assert result.exit_code == 0, result.output
    # The API says the same when a resumed config differs from the run's.
    cfg = TrainConfig(method="abs", base_batch=32, batch=64, lr=0.01, model="mlp", epochs=2, resume=str(first),
                      out=str(tmp_path / "third"), quiet=True)
    with pytest.raises(UserError, match=r"--method abs \(the run has sgd\)"):
        train(cfg, plot=False)


def test_resume_refuses_what_would_lose_or_mix_runs(tmp_path: Path) -> None:
    base = ["train", "--quiet", "--dataset", "digits", "--model", "mlp", "--batch", "64", "--base-batch", "64"]
    done = tmp_path / "a"
    assert CliRunner().invoke(main, [*base, "--epochs", "1", "--out", str(done)]).exit_code == 0
    other = tmp_path / "b"
    assert CliRunner().invoke(main, [*base, "--epochs", "1", "--out", str(other), "--seed", "3"]).exit_code == 0
    files = {p: p.read_bytes() for p in (*done.rglob("*"), *other.rglob("*")) if p.is_file()}
    cases = {  # args -> words the one-line message must hold
        ("--epochs", "2", "--resume", str(done), "--out", str(other)):
            ["already holds a run", "--overwrite", f"--resume {other} to continue the run there"],
        ("--epochs", "2", "--resume", str(done), "--nesterov"): ["--nesterov on (the run has off)"],
        ("--epochs", "1", "--resume", str(done)): ["already reached epoch 1", "--epochs above 1"],
        ("--epochs", "2", "--resume", str(done), "--model", "cnn"): ["--model cnn (the run has mlp)", "leave them out"],
        ("--epochs", "2", "--resume", str(done), "--test-subset", "9999"): ["--test-subset 9999 exceeds the 360 test"],
        ("--epochs", "2", "--resume", str(done), "--method", "sgd", "--lr", "0.2"):
            ["--method sgd (the run has absa)", "--lr 0.2 (the run has 0.1)"],
    }
    for args, words in cases.items():
        result = CliRunner().invoke(main, [*base, *args])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert all(w in lines[0] for w in words), lines[0]
    assert {p: p.read_bytes() for p in files} == files  # neither run was touched


def test_unwritable_out_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["train", "--out", str(blocker / "sub"), "--quiet"])
    assert result.exit_code == 2 and "--out" in result.output
    # An existing folder nothing can be created in, also for root (it ended in a traceback).
    result = CliRunner().invoke(main, ["train", "--out", "/proc", "--quiet", "--epochs", "1"])
    assert result.exit_code == 2 and "--out /proc is not writable" in result.output, result.output


def test_train_and_test_subsets_are_fixed_and_used(tmp_path):
    from hvd_abs.metrics import read_metrics
    from hvd_abs.training import TrainConfig, train

    cfg = TrainConfig(method="sgd", dataset="digits", model="mlp", epochs=1, base_batch=32, batch=32,
                      train_subset=320, test_subset=100, out=str(tmp_path / "a"), quiet=True)
    train(cfg, plot=False)
    (line,), _ = read_metrics(tmp_path / "a")
    assert line["samples_seen"] == 320 and line["updates"] == 10  # 320 / 32, no short batch
    # Fixed: two trainers (other seeds) hold the same subsets; used: of the sizes asked for.
    from hvd_abs.data import load_dataset

    data = load_dataset("digits")
    a = Trainer(TrainConfig(**{**cfg.__dict__, "seed": 1, "out": str(tmp_path / "b")}), data=data)
    b = Trainer(TrainConfig(**{**cfg.__dict__, "seed": 2, "out": str(tmp_path / "c")}), data=data)
    assert a.data.train_x.shape[0] == 320 and a.data.test_x.shape[0] == 100
    assert torch.equal(a.data.train_x, b.data.train_x) and torch.equal(a.data.test_y, b.data.test_y)


def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A run stopped mid-epoch (checkpoint at --stop-at-update) and continued with --resume has
    the same controller, LR, sampler and metrics as one that never stopped (crops and flips
    included: they are drawn from the epoch, not from the process's RNG)."""
    from hvd_abs.training.checkpoint import load_latest
    from hvd_abs.metrics import read_metrics
    from hvd_abs.training import TrainConfig, train

    common = dict(method="absa", dataset="digits", model="mlp", epochs=4, base_batch=32, batch=32,
                  max_batch=128, duration=1, eig_samples=128, augment="crop-flip", quiet=True, threads=1)
    full = train(TrainConfig(**common, out=str(tmp_path / "full")), plot=False)
    train(TrainConfig(**common, out=str(tmp_path / "cut"), stop_at_update=60), plot=False)
    path, state = load_latest(tmp_path / "cut" / "checkpoints")
    assert state["updates"] == 60 and state["sampler"]["position"] > 0  # stopped mid-epoch
    resumed = train(TrainConfig(**{**common, "out": str(tmp_path / "cut"), "resume": str(tmp_path / "cut")}), plot=False)

    timing = {"epoch_s", "samples_per_s", "second_order_s"}
    a, _ = read_metrics(tmp_path / "full")
    b, _ = read_metrics(tmp_path / "cut")
    assert [{k: v for k, v in e.items() if k not in timing} for e in b] == \
           [{k: v for k, v in e.items() if k not in timing} for e in a]
    for key in ("updates", "final_batch", "num_growths", "final_lr", "final_test_acc", "growths"):
        assert resumed[key] == full[key], key


def test_extending_a_finished_run_equals_a_run_planned_that_long(tmp_path):
    """--resume DIR --epochs more: the growth check after the finished run's last epoch, skipped
    then (it would have applied to nothing), comes before the next epoch, so the batch grows as
    in a run planned that long from the start. (lr_decay 1: the default decay epochs follow
    --epochs.)"""
    from hvd_abs.metrics import read_metrics
    from hvd_abs.training import TrainConfig, train

    common = dict(method="abs", dataset="digits", model="mlp", base_batch=32, batch=32, max_batch=128, duration=1,
                  eig_samples=128, lr_decay=1.0, quiet=True, threads=1)
    full = train(TrainConfig(**common, epochs=4, out=str(tmp_path / "full")), plot=False)
    train(TrainConfig(**common, epochs=2, out=str(tmp_path / "ext")), plot=False)
    extended = train(TrainConfig(**common, epochs=4, out=str(tmp_path / "ext"), resume=str(tmp_path / "ext")), plot=False)

    timing = {"epoch_s", "samples_per_s", "second_order_s"}
    a, _ = read_metrics(tmp_path / "full")
    b, _ = read_metrics(tmp_path / "ext")
    assert [e["global_batch"] for e in a] == [32, 32, 64, 128]  # growths after epochs 2 and 3
    assert [{k: v for k, v in e.items() if k not in timing} for e in b] == \
           [{k: v for k, v in e.items() if k not in timing} for e in a]
    assert extended["growths"] == full["growths"] and extended["updates"] == full["updates"]


def test_a_resume_drops_the_lines_of_an_attempt_after_its_checkpoint(tmp_path, caplog):
    """An attempt that ended after the checkpoint without one of its own (killed) left epoch and
    event lines of work the resumed run redoes, here with other --epochs: they are replaced, not
    kept (they had the 9-epoch plan's LR), so the file equals a run that was never interrupted."""
    import shutil

    from hvd_abs.metrics import read_metrics
    from hvd_abs.training import TrainConfig, train

    common = dict(method="sgd", dataset="digits", model="mlp", lr_decay=0.5, quiet=True, threads=1)
    run, ref = tmp_path / "run", tmp_path / "ref"
    train(TrainConfig(**common, epochs=2, out=str(run)), plot=False)
    shutil.copytree(run, ref)
    # The attempt: 9 epochs planned, stopped in epoch 5 (its checkpoint at the stop then lost).
    train(TrainConfig(**common, epochs=9, stop_at_update=50, out=str(run), resume=str(run)), plot=False)
    newest = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert newest.name == "ckpt-000050.pt"
    newest.unlink()
    assert [e["epoch"] for e in read_metrics(run)[0]] == [1, 2, 3, 4]
    train(TrainConfig(**common, epochs=6, out=str(run), resume=str(run)), plot=False)
    train(TrainConfig(**common, epochs=6, out=str(ref), resume=str(ref)), plot=False)
    assert "3 lines after the checkpoint (epoch 2, update 22) dropped" in caplog.text  # epochs 3-4, its checkpoint
    drop_times = lambda r: {k: v for k, v in r.items() if k not in ("epoch_s", "samples_per_s", "seconds", "path")}  # noqa: E731
    (ep, ev), (ep_ref, ev_ref) = read_metrics(run), read_metrics(ref)
    assert [drop_times(e) for e in ep] == [drop_times(e) for e in ep_ref] and len(ep) == 6
    assert [drop_times(e) for e in ev] == [drop_times(e) for e in ev_ref]


def test_a_resume_with_other_epochs_follows_their_plan(tmp_path):
    """--epochs may change on --resume; what follows it follows the new value: a 6-epoch run
    stopped after 2 epochs and resumed with --epochs 9 decays its LR at 3 and 6 (E/3, 2E/3) and
    stops ABSA at 4.5, as a run planned for 9 epochs does."""
    from hvd_abs.metrics import read_metrics
    from hvd_abs.training import TrainConfig, train

    common = dict(method="sgd", dataset="digits", model="mlp", lr_decay=0.5, quiet=True, threads=1)
    train(TrainConfig(**common, epochs=9, out=str(tmp_path / "planned")), plot=False)
    train(TrainConfig(**common, epochs=6, stop_at_update=22, out=str(tmp_path / "cut")), plot=False)  # 11 a epoch
    train(TrainConfig(**common, epochs=9, out=str(tmp_path / "cut"), resume=str(tmp_path / "cut")), plot=False)
    lrs = lambda run: [e["lr"] for e in read_metrics(tmp_path / run)[0]]  # noqa: E731
    assert lrs("planned") == [0.1] * 3 + [0.05] * 3 + [0.025] * 3
    assert lrs("cut") == lrs("planned")  # (the 6-epoch plan decays at 2 and 4)

    # The cosine's length, too: each epoch's LR is that of its last update, at t = its end.
    cosine = dict(common, lr_decay=TrainConfig.lr_decay, lr_schedule="cosine")
    train(TrainConfig(**cosine, epochs=6, stop_at_update=16, out=str(tmp_path / "cos")), plot=False)  # in epoch 2
    train(TrainConfig(**cosine, epochs=9, out=str(tmp_path / "cos"), resume=str(tmp_path / "cos")), plot=False)
    ends = [e + 11 * 128 / 1437 for e in range(9)]  # 11 updates of 128 in an epoch of 1437 samples
    assert lrs("cos")[:1] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 6)) for t in ends[:1]])
    assert lrs("cos")[1:] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 9)) for t in ends[1:]])

    absa = dict(common, method="absa", eig_samples=128)
    train(TrainConfig(**absa, epochs=6, stop_at_update=16, out=str(tmp_path / "absa")), plot=False)
    train(TrainConfig(**absa, epochs=9, out=str(tmp_path / "absa"), resume=str(tmp_path / "absa")), plot=False)
    assert [e["adv_ratio"] > 0 for e in read_metrics(tmp_path / "absa")[0]] == [True] * 5 + [False] * 4


def test_a_stall_at_an_epoch_boundary_counts_in_the_next_epoch(digits, tmp_path):
    """A resize at an epoch's end: the epoch-end commit raises, the job resets to it and waits for
    the new worker. That stall belongs to the next epoch's time (it counted in no epoch)."""
    import time

    from hvd_abs.metrics import MetricsWriter

    from hvd_abs.training import Callback

    committed = {}

    class Commit(Callback):
        def on_epoch_end(self, trainer):
            committed.update(state=copy.deepcopy(trainer.state_dict()))

    t = Trainer(TrainConfig(method="sgd", model="mlp", epochs=2, quiet=True, threads=1, out=str(tmp_path / "r")),
                data=digits, callbacks=[Commit()])
    writer = MetricsWriter(tmp_path / "r")
    t.run_epoch(writer)
    time.sleep(0.6)  # the reset and the rendezvous with the new worker
    t.load_state_dict(committed["state"])
    assert t.run_epoch(writer)["epoch_s"] >= 0.6


def test_an_epoch_line_is_shown_before_the_epoch_end_hook_may_raise(digits, tmp_path):
    """An elastic job's epoch-end commit raises to resize the job; the line of the epoch it ended
    is shown all the same (the launch's live output skipped it)."""
    from hvd_abs.metrics import MetricsWriter

    class Resize(Exception):
        pass

    from hvd_abs.training import Callback

    shown: list[dict] = []

    class Commit(Callback):
        def on_epoch_logged(self, trainer, record):
            shown.append(record)

        def on_epoch_end(self, trainer):
            raise Resize

    t = Trainer(TrainConfig(method="sgd", model="mlp", epochs=2, quiet=True, threads=1, out=str(tmp_path / "r")),
                data=digits, callbacks=[Commit()])
    with pytest.raises(Resize):
        t.run_epoch(MetricsWriter(tmp_path / "r"))
    assert [r["epoch"] for r in shown] == [1]


def test_a_checkpoint_from_before_the_new_options_resumes_as_it_ran(tmp_path):
    """Checkpoints written before --epochs, --lr-schedule, --augment, --nesterov and
    --label-smoothing were kept: a plain --resume runs to the planned end (the adversarial
    schedule's length) with the LR the run had, and a new option given is refused, not dropped."""
    from hvd_abs.training.checkpoint import load_latest, save_checkpoint

    common = dict(method="sgd", dataset="digits", model="mlp", lr_decay=0.5, quiet=True, threads=1)
    train(TrainConfig(**common, epochs=6, out=str(tmp_path / "whole")), plot=False)
    train(TrainConfig(**common, epochs=6, stop_at_update=25, out=str(tmp_path / "old")), plot=False)
    path, state = load_latest(tmp_path / "old" / "checkpoints")
    for key in ("epochs", "checkpoint_every", "test_subset", "lr_schedule", "augment", "nesterov", "label_smoothing"):
        state["config"].pop(key)
    for key in ("schedule", "total_epochs"):
        state["lr_schedule"].pop(key)
    save_checkpoint(tmp_path / "old" / "checkpoints", state, state["updates"])  # (the same file, replaced)
    for given, says in ((["--lr-schedule", "cosine"], "--lr-schedule cosine (the run has step)"),
                        (["--augment", "crop-flip"], "--augment crop-flip (the run has none)")):
        result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "old"), *given])
        assert result.exit_code == 2 and says in result.output, result.output
    result = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(tmp_path / "old")])
    assert result.exit_code == 0, result.output
    lrs = lambda run: [e["lr"] for e in read_metrics(tmp_path / run)[0]]  # noqa: E731
    assert lrs("old") == lrs("whole") == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(digits, tmp_path: Path) -> None:
    from hvd_abs.training import REPLACED_DIR, train

    out = tmp_path / "run"
    cfg = TrainConfig(method="sgd", model="mlp", epochs=1, batch=64, base_batch=64, out=str(out), quiet=True)
    train(cfg, plot=False)
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(p.parts[0] == "checkpoints" for p in old)

    def boom(*args, **kwargs):
        raise RuntimeError("the new run died")

    again = TrainConfig(**{**cfg.__dict__, "method": "abs", "overwrite": True})
    for _ in range(2):  # a second failed --overwrite must not replace the kept run with the failed one
        with pytest.raises(RuntimeError, match="died"):
            train(again, eigen_fn=boom, plot=False)
        kept = out / REPLACED_DIR
        assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == old
    # A run without --overwrite is refused there: finishing, it would delete the kept run.
    for name in [p.name for p in out.iterdir() if p.name != REPLACED_DIR]:  # (the failed run's partial files)
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    with pytest.raises(UserError, match=f"holds, in {out / REPLACED_DIR}, the run that an unfinished --overwrite"):
        train(TrainConfig(**{**cfg.__dict__, "seed": 5}), plot=False)
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == old
    train(TrainConfig(**{**cfg.__dict__, "overwrite": True, "seed": 5}), plot=False)
    assert not (out / REPLACED_DIR).exists() and (out / "summary.json").exists()
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 5
