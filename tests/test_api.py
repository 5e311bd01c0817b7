"""The library entry for your own model and data (hvd_abs/api.py), in one process, and the
`--script` option of both launchers up to the worker they start. tests/test_elastic_horovod.py
and tests/test_ray_elastic.py run examples/custom_model.py as a real elastic job."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import hvd_abs
from conftest import REPO, run_checked
from hvd_abs.cli import main as cli
from hvd_abs.launch import ray_executor
from hvd_abs.launch.horovod import build_command
from hvd_abs.metrics import read_metrics
from hvd_abs.models import Normalize

EXAMPLE = REPO / "examples" / "custom_model.py"


@pytest.fixture(scope="module")
def digits() -> hvd_abs.Splits:
    """Real digits, as a user would hand them over: uint8-scaled tensors of their own."""
    d = hvd_abs.load_dataset("digits")
    to_u8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    return hvd_abs.splits_from_tensors(to_u8(d.train_x), d.train_y, to_u8(d.test_x), d.test_y, name="mine")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_splits_from_tensors_scales_counts_and_describes(digits):
    assert digits.train_x.dtype == torch.float32 and float(digits.train_x.max()) == 1.0
    assert digits.num_classes == 10 and digits.in_shape == (1, 8, 8) and digits.name == "mine"
    assert digits.mean[0] == pytest.approx(float(digits.train_x.mean()), rel=1e-5)
    assert digits.std[0] == pytest.approx(float(digits.train_x.std(correction=0)), rel=1e-4)
    # Non-image samples: statistics per feature (dim 1).
    feats = hvd_abs.splits_from_tensors(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 2]),
                                        torch.zeros(1, 2), torch.tensor([1]), classes=["a", "b", "c"])
    assert feats.mean == (1.0, 1.0) and feats.std == (1.0, 0.0) and feats.num_classes == 3
    assert feats.in_shape == (2,) and feats.classes == ("a", "b", "c")


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "train_y": a["train_y"][:-1]}, "one class index per sample"),
    (lambda a: {**a, "train_y": a["train_y"].float()}, r"integer class indices \(y.long\(\)\)"),
    (lambda a: {**a, "test_y": a["test_y"] + 20, "classes": list("0123456789")}, r"labels must be in \[0, num_classes\)"),
    (lambda a: {**a, "train_y": a["train_y"] - 1}, r"labels must be in \[0, num_classes\)"),
    (lambda a: {**a, "test_x": a["test_x"][:, :, :4]}, "same sample shape"),
    (lambda a: {**a, "train_x": a["train_x"].int()}, "float32 in \\[0, 1\\] or uint8"),
    (lambda a: {**a, "train_x": a["train_x"].clone().index_fill_(0, torch.tensor([3]), float("nan"))}, "NaN"),
    (lambda a: {**a, "train_x": a["train_x"].numpy()}, "torch.as_tensor"),
    (lambda a: {**a, "test_x": a["test_x"][:0], "test_y": a["test_y"][:0]}, "N >= 1"),
    (lambda a: {**a, "num_classes": 5}, r"labels must be in \[0, num_classes\)"),
    (lambda a: {**a, "num_classes": 10, "classes": ["x"] * 9}, "one name per class"),
])
def test_splits_from_tensors_refuses_bad_input_naming_the_fix(digits, change, message):
    good = {"train_x": digits.train_x, "train_y": digits.train_y, "test_x": digits.test_x, "test_y": digits.test_y}
    args = change(good)
    with pytest.raises(hvd_abs.UserError, match=message):
        hvd_abs.splits_from_tensors(args.pop("train_x"), args.pop("train_y"), args.pop("test_x"),
                                    args.pop("test_y"), **args)


def test_splits_from_datasets_equals_the_tensors(digits):
    class Named(TensorDataset):
        classes = [str(i) for i in range(10)]

    got = hvd_abs.splits_from_datasets(Named(digits.train_x, digits.train_y), TensorDataset(digits.test_x, digits.test_y),
                                       batch_size=100)
    assert torch.equal(got.train_x, digits.train_x) and torch.equal(got.test_y, digits.test_y)
    assert got.classes == tuple(Named.classes) and got.mean == digits.mean

    # A Subset (the usual way to hold out data) takes the classes of the data set it comes from.
    sub = hvd_abs.splits_from_datasets(Subset(Named(digits.train_x, digits.train_y), range(100)),
                                       TensorDataset(digits.test_x, digits.test_y))
    assert sub.classes == tuple(Named.classes) and torch.equal(sub.train_y, digits.train_y[:100])


class Samples(Dataset):
    """A data set of len(items) samples; item i is items[i], or raises it if it is an exception."""

    def __init__(self, *items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        if isinstance(self.items[i], Exception):
            raise self.items[i]
        return self.items[i]


@pytest.mark.parametrize("samples, message", [
    ([(object(), 1)], r"inputs cannot be stacked .*transforms.ToTensor\(\)"),  # a PIL image, say: no ToTensor()
    ([(torch.zeros(2), "cat")], "labels are not integer class indices"),
    ([(torch.zeros(2), 0.5)], "labels are not integer class indices"),
    ([(torch.zeros(2), 1, "extra")], r"not \(input, label\) pairs"),
    ([(torch.zeros(2), 0), (torch.zeros(3), 1)], "cannot be stacked"),
])
def test_splits_from_datasets_refuses_samples_it_cannot_use(samples, message):
    good = Samples((torch.zeros(2), 0))
    with pytest.raises(hvd_abs.UserError, match=message):
        hvd_abs.splits_from_datasets(Samples(*samples), good)
    with pytest.raises(hvd_abs.UserError, match="map-style"):
        hvd_abs.splits_from_datasets(iter([]), good)
    with pytest.raises(hvd_abs.UserError, match=r"a DataLoader: pass its Dataset \(loader.dataset\)"):
        hvd_abs.splits_from_datasets(DataLoader(good), good)
    with pytest.raises(hvd_abs.UserError, match="empty"):
        hvd_abs.splits_from_datasets(Samples(), good)


def test_splits_from_datasets_lets_the_data_sets_own_errors_through():
    with pytest.raises(KeyError, match="missing file 7"):  # the user's bug, with its own traceback
        hvd_abs.splits_from_datasets(Samples((torch.zeros(2), 0), KeyError("missing file 7")),
                                     Samples((torch.zeros(2), 0)), batch_size=1)


def test_normalize_works_per_channel_at_any_rank():
    norm = Normalize([1.0, 2.0], [2.0, 4.0])
    assert torch.equal(norm(torch.tensor([[3.0, 6.0]])), torch.tensor([[1.0, 1.0]]))  # (N, C)
    assert norm(torch.ones(5, 2, 7)).shape == (5, 2, 7)  # (N, C, L)
    assert torch.equal(norm(torch.full((1, 2, 3, 3), 2.0))[0, :, 0, 0], torch.tensor([0.5, 0.0]))


def test_fit_trains_your_model_on_your_data_and_resumes(digits, tmp_path, capsys):
    common = dict(method="abs", epochs=3, base_batch=32, max_batch=128, duration=1, eig_samples=256, seed=3, quiet=True,
                  checkpoint_every=1)
    summary = hvd_abs.fit(model=TinyNet, data=digits, out=str(tmp_path / "a"), **common)
    assert summary["dataset"] == "mine" and summary["model"] == "TinyNet" and summary["final_test_acc"] > 0.5
    assert [g["new_batch"] for g in summary["growths"]] == [64]  # grew (--duration 1), as hvd-abs train does
    assert "method abs on mine (TinyNet)" in capsys.readouterr().out  # the CLI's final table
    # The factory is called after seeding: the same seed, the same run.
    again = hvd_abs.fit(model=lambda: TinyNet(), data=digits, out=str(tmp_path / "b"), echo=False, **common)
    assert again["final_test_acc"] == summary["final_test_acc"] and again["updates"] == summary["updates"]
    assert capsys.readouterr().out == ""
    # A module instance is trained in place.
    net = TinyNet()
    before = [p.detach().clone() for p in net.parameters()]
    hvd_abs.fit(model=net, data=digits, out=str(tmp_path / "c"), echo=False, **{**common, "epochs": 1})
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    # Resumed with your model: in its own folder, with its own options (abs, base batch 32, ...),
    # from fit's keywords as from a script's --resume.
    more = hvd_abs.fit(model=TinyNet, data=digits, resume=str(tmp_path / "a"), epochs=4, echo=False)
    assert more["resumed_from"].endswith(f"ckpt-{summary['updates']:06d}.pt") and more["updates"] > summary["updates"]
    cfg, _ = hvd_abs.parse_train_args(["--resume", str(tmp_path / "a"), "--epochs", "5"])
    hvd_abs.fit(cfg, model=TinyNet, data=digits, echo=False)
    # A config made by hand: its non-default fields count as given, the rest come from the run.
    hvd_abs.fit(hvd_abs.TrainConfig(resume=str(tmp_path / "a"), epochs=6, quiet=True), model=TinyNet, data=digits,
                echo=False)
    epochs, _ = read_metrics(tmp_path / "a")
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5, 6] and {e["global_batch"] for e in epochs} == {32, 64, 128}
    class Wider(TinyNet):  # the same class made with other options (a script's own --width)
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    with pytest.raises(hvd_abs.UserError, match=r"\(size mismatch for .*torch.Size\(\[48, 64\]\)\.\); give it the "
                                                r"model the run trained \(the same class, built with the same options"):
        hvd_abs.fit(model=Wider, data=digits, resume=str(tmp_path / "a"), epochs=6, echo=False)
    with pytest.raises(hvd_abs.UserError, match="--method sgd .the run has abs."):
        hvd_abs.fit(model=TinyNet, data=digits, resume=str(tmp_path / "a"), epochs=6, method="sgd")
    # Other data, of another size or the same size: refused, naming what differs.
    fewer = hvd_abs.splits_from_tensors(digits.train_x[:1000], digits.train_y[:1000], digits.test_x, digits.test_y)
    with pytest.raises(hvd_abs.UserError, match=r"trained on other data: train samples 1000 \(the run had 1437\)"):
        hvd_abs.fit(model=TinyNet, data=fewer, resume=str(tmp_path / "a"), epochs=6)
    flipped = hvd_abs.splits_from_tensors(digits.train_x.flip(-1), digits.train_y, digits.test_x, digits.test_y)
    with pytest.raises(hvd_abs.UserError, match=r"trained on other data: input crc32 \d+ \(the run had \d+\)"):
        hvd_abs.fit(model=TinyNet, data=flipped, resume=str(tmp_path / "a"), epochs=6)


def _accuracy(model: nn.Module, data: hvd_abs.Splits) -> float:
    with torch.no_grad():
        return (model(data.test_x).argmax(1) == data.test_y).double().mean().item()


def test_a_run_leaves_its_trained_model_for_load_model_and_torch_load(digits, tmp_path):
    """OUT/model.pt holds the weights where the run ended: the final test accuracy comes back
    from it, through load_model (built-in and own models) and through plain torch.load."""
    common = dict(method="sgd", epochs=2, base_batch=32, seed=1, quiet=True, echo=False)
    own = hvd_abs.fit(model=TinyNet, data=digits, out=str(tmp_path / "own"), **common)
    net = hvd_abs.load_model(tmp_path / "own", model=TinyNet)
    assert not net.training and _accuracy(net, digits) == own["final_test_acc"]
    assert _accuracy(hvd_abs.load_model(tmp_path / "own" / "model.pt", model=TinyNet), digits) == own["final_test_acc"]
    assert own["weights"] == str(tmp_path / "own" / "model.pt") and own["resets"] == []  # (a fixed world)
    own_model_named = r"trained your own model \(TinyNet\): pass it as the run built it, load_model\(\.\.\., model=\.\.\.\)"
    with pytest.raises(hvd_abs.UserError, match=own_model_named):
        hvd_abs.load_model(tmp_path / "own")
    plain = TinyNet()
    plain.load_state_dict(torch.load(tmp_path / "own" / "model.pt", weights_only=True))  # no hvd_abs needed
    assert _accuracy(plain.eval(), digits) == own["final_test_acc"]

    built = hvd_abs.fit(model=None, data=digits, out=str(tmp_path / "cnn"), **common)
    cnn = hvd_abs.load_model(tmp_path / "cnn")  # rebuilt from summary.json: cnn, 10 classes, (1, 8, 8)
    assert built["model"] == "cnn" and _accuracy(cnn, digits) == built["final_test_acc"]
    # Its input statistics come from the weights file, not from the placeholders it was built with.
    assert torch.allclose(cnn.normalize.mean.flatten(), torch.tensor(digits.mean))

    with pytest.raises(hvd_abs.UserError, match=r"does not fit TinyNet .*pass the model the run trained"):
        hvd_abs.load_model(tmp_path / "cnn", model=TinyNet())
    with pytest.raises(hvd_abs.UserError, match=r"needs width: pass e.g. model=lambda"):
        hvd_abs.load_model(tmp_path / "own", model=lambda width: TinyNet())
    # A run that continues in its folder drops its model.pt until it ends again (the checkpoints
    # keep the weights): a crash on the way leaves no stale model.pt for load_model to give.
    from hvd_abs.training import TrainConfig, open_writer

    open_writer(tmp_path / "cnn", TrainConfig(out=str(tmp_path / "cnn")).resumes_in_place, rank=0).close()  # a new run: kept
    assert (tmp_path / "cnn" / "model.pt").exists()
    cfg = TrainConfig(out=str(tmp_path / "cnn"), resume=str(tmp_path / "cnn"))
    open_writer(tmp_path / "cnn", cfg.resumes_in_place, rank=1).close()  # (rank 0's to drop)
    assert (tmp_path / "cnn" / "model.pt").exists()
    open_writer(tmp_path / "cnn", cfg.resumes_in_place, rank=0).close()
    assert not (tmp_path / "cnn" / "model.pt").exists() and (tmp_path / "cnn" / "summary.json").exists()
    with pytest.raises(hvd_abs.UserError, match=r"model.pt does not exist \(no run ended there"):
        hvd_abs.load_model(tmp_path / "nowhere")
    (tmp_path / "own" / "model.pt").rename(tmp_path / "kept.pt")  # as a run that crashed would leave it
    with pytest.raises(hvd_abs.UserError, match=r"the run has not finished: continue it with --resume"):
        hvd_abs.load_model(tmp_path / "own", model=TinyNet)
    (tmp_path / "own" / "model.pt").write_bytes((tmp_path / "kept.pt").read_bytes()[:500])
    with pytest.raises(hvd_abs.UserError, match=r"is not a readable state dict"):
        hvd_abs.load_model(tmp_path / "own", model=TinyNet)


def test_damaged_run_files_give_one_line_not_a_traceback(digits, tmp_path):
    """QA: load_model and `hessian --run` on a summary.json or model.pt with the wrong shape of
    content raised AttributeError, IndexError, KeyError or TypeError from deep inside."""
    import shutil

    from click.testing import CliRunner

    from hvd_abs.cli import main

    run = tmp_path / "run"
    hvd_abs.fit(data=digits, model=None, method="sgd", epochs=1, quiet=True, echo=False, out=str(run))
    good = json.loads((run / "summary.json").read_text())
    summaries = {"model": {**good, "model": 5}, "in_shape": {**good, "in_shape": []}, "config": {**good, "config": 5},
                 "dataset": {**good, "config": {}}, "data_dir": {**good, "config": {**good["config"], "data_dir": 7}}}
    for name, summary in summaries.items():
        bad = tmp_path / name
        shutil.copytree(run, bad)
        (bad / "summary.json").write_text(json.dumps(summary))
        if name in ("model", "in_shape"):
            with pytest.raises(hvd_abs.UserError, match="does not say which model the run trained"):
                hvd_abs.load_model(bad)
        if name != "in_shape":  # (hessian takes the shape from the data set)
            result = CliRunner().invoke(main, ["hessian", "--run", str(bad), "--samples", "64"])
            assert result.exit_code == 2 and "holds no readable summary.json" in result.output, (name, result.output)
    for content in ([1, 2, 3], torch.zeros(3)):
        torch.save(content, tmp_path / "model" / "model.pt")
        with pytest.raises(hvd_abs.UserError, match=f"holds a {type(content).__name__}, not a state dict"):
            hvd_abs.load_model(tmp_path / "model", model=TinyNet)
    with pytest.raises(hvd_abs.UserError, match="model= must be a torch.nn.Module or a class or function making one, "
                                                "got str 'cnn'"):
        hvd_abs.load_model(run, model="cnn")
    with pytest.raises(hvd_abs.UserError, match="metrics.jsonl is a file, not a run"):
        hvd_abs.load_model(run / "metrics.jsonl")


def test_fit_refuses_what_it_cannot_train(digits, tmp_path):
    out = str(tmp_path / "x")
    shifted = hvd_abs.splits_from_tensors(digits.train_x - 0.5, digits.train_y, digits.test_x, digits.test_y)
    with pytest.raises(hvd_abs.UserError, match=r"absa needs inputs in \[0, 1\].*hvd_abs.models.Normalize"):
        hvd_abs.fit(model=TinyNet, data=shifted, method="absa", out=out)
    with pytest.raises(hvd_abs.UserError, match="splits_from_tensors"):
        hvd_abs.fit(model=TinyNet, data=(digits.train_x, digits.train_y), out=out)
    flat = hvd_abs.splits_from_tensors(digits.train_x.flatten(1), digits.train_y, digits.test_x.flatten(1), digits.test_y)
    with pytest.raises(hvd_abs.UserError, match=r"pass your own model \(fit\(model=...\)\)"):
        hvd_abs.fit(data=flat, method="sgd", out=out)
    with pytest.raises(hvd_abs.UserError, match="a function returning one"):
        hvd_abs.fit(model="resnet20", data=digits, out=out)
    class Needs(TinyNet):
        def __init__(self, width: int) -> None:
            super().__init__()

    with pytest.raises(hvd_abs.UserError, match=r"Needs needs width: pass e.g. model=lambda: MyNet\(width=16\)"):
        hvd_abs.fit(model=Needs, data=digits, out=out)
    with pytest.raises(hvd_abs.UserError, match="model= made a str, not a torch.nn.Module"):
        hvd_abs.fit(model=lambda: "resnet20", data=digits, out=out)
    # Options that pick built-in models and data, given with your own: one of them must go.
    for argv, says in ((["--model", "mlp"], "--model mlp names a built-in model"),
                       (["--dataset", "cifar10"], "--dataset cifar10 picks a built-in data set"),
                       (["--download"], "--dataset digits --download picks a built-in data set")):
        cfg, _ = hvd_abs.parse_train_args([*argv, "--out", out])
        with pytest.raises(hvd_abs.UserError, match=says):
            hvd_abs.fit(cfg, model=TinyNet, data=digits)
    # A model that does not fit the data is refused before the run starts, with the shapes.
    hwc = hvd_abs.splits_from_tensors(digits.train_x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1), digits.train_y,
                                      digits.test_x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1), digits.test_y)
    conv = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))  # noqa: E731
    with pytest.raises(hvd_abs.UserError, match=r"shaped \(2, 8, 8, 3\).*channels-last.*permute\(0, 3, 1, 2\)"):
        hvd_abs.fit(model=conv, data=hwc, out=out)
    with pytest.raises(hvd_abs.UserError, match=r"gives \(2, 5\) for a batch of 2: it must give \(2, 10\) logits"):
        hvd_abs.fit(model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), data=digits, out=out)
    class AuxHead(TinyNet):  # as torchvision's GoogLeNet: a second output in training mode only
        def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            out = self.body(x)
            return (out, out) if self.training else out

    with pytest.raises(hvd_abs.UserError, match=r"gives tuple in training mode for a batch of 2: it must give \(2, 10\)"):
        hvd_abs.fit(model=AuxHead, data=digits, out=out)
    with pytest.raises(hvd_abs.UserError, match="--test-subset 5000 exceeds the 360 test samples: pass at most 360"):
        hvd_abs.fit(model=TinyNet, data=digits, out=out, test_subset=5000)
    with pytest.raises(TypeError, match=r"unknown options \['epoch'\] \(did you mean epochs\?\)"):
        hvd_abs.fit(model=TinyNet, data=digits, out=out, epoch=3)
    with pytest.raises(hvd_abs.UserError, match="--epochs must be a positive integer"):
        hvd_abs.fit(model=TinyNet, data=digits, out=out, epochs=0)
    assert not Path(out).exists()  # nothing written for a refused run


def test_the_model_check_leaves_the_model_and_the_rng_as_they_were(digits, tmp_path):
    from hvd_abs.training import check_model_fits as _check_model_fits

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 10))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    _check_model_fits(net, digits, torch.device("cpu"))
    assert net.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # running stats, batch count
    net.eval()
    _check_model_fits(net, digits, torch.device("cpu"))
    assert not net.training

    class Counts(TinyNet):  # a buffer that forward replaces, and Python's RNG drawn from
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import random

            self.seen = self.seen + len(x) + random.random()
            if not hasattr(self, "cache"):
                self.register_buffer("cache", x.detach().clone())
            return super().forward(x)

    import random

    counts, state = Counts(), random.getstate()
    _check_model_fits(counts, digits, torch.device("cpu"))
    assert counts.seen.item() == 0 and random.getstate() == state
    assert dict(counts.named_buffers())["seen"] is counts.seen and not hasattr(counts, "cache")


def test_a_lazy_model_trains_and_a_run_that_fails_early_leaves_no_run_behind(digits, tmp_path):
    # Lazy modules take their shapes from the check's forward (before the optimizer and any
    # broadcast of the weights).
    lazy = hvd_abs.fit(model=lambda: nn.Sequential(nn.Flatten(), nn.LazyLinear(10)), data=digits, method="sgd",
                       epochs=1, base_batch=64, out=str(tmp_path / "lazy"), quiet=True, echo=False)
    assert lazy["final_test_acc"] > 0.5

    class BreaksInTraining(TinyNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                raise RuntimeError("a bug in training mode")
            return super().forward(x)

    out = tmp_path / "run"
    with pytest.raises(hvd_abs.UserError, match=r"the model fails in training mode .*a bug in training mode"):
        hvd_abs.fit(model=BreaksInTraining, data=digits, method="sgd", epochs=1, out=str(out), echo=False)

    class BreaksOnFullBatches(TinyNet):  # passes the 2-sample check, fails in the first update
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(x) > 2:
                raise RuntimeError("a bug at batch size 64")
            return super().forward(x)

    with pytest.raises(RuntimeError, match="a bug at batch size 64"):
        hvd_abs.fit(model=BreaksOnFullBatches, data=digits, method="sgd", epochs=1, base_batch=64, out=str(out),
                    echo=False)
    assert not (out / "metrics.jsonl").exists()  # nothing recorded: the fixed rerun needs no --overwrite
    again = hvd_abs.fit(model=TinyNet, data=digits, method="sgd", epochs=1, out=str(out), quiet=True, echo=False)
    assert again["epochs"] == 1


def test_a_resumed_script_keeps_the_epochs_its_command_line_gave(digits, tmp_path):
    """--epochs 90 given to a script resuming a run planned for 2 is the script's choice, though it
    is the default (fit resolved the resume again and took the run's 2)."""
    hvd_abs.fit(model=TinyNet, data=digits, method="sgd", epochs=2, out=str(tmp_path / "r"), quiet=True, echo=False)
    cfg, _ = hvd_abs.parse_train_args(["--resume", str(tmp_path / "r"), "--epochs", "90", "--stop-at-update", "30"])
    summary = hvd_abs.fit(cfg, model=TinyNet, data=digits, echo=False)
    assert summary["config"]["epochs"] == 90 and summary["updates"] == 30


def test_parse_train_args_reads_train_options_and_returns_the_rest(tmp_path, capsys):
    cfg, rest = hvd_abs.parse_train_args(["--method", "sgd", "--width", "8", "--elastic", "--max-np", "2",
                                          "--out", str(tmp_path), "--flag"])
    assert (cfg.method, cfg.elastic, cfg.max_np, cfg.out) == ("sgd", True, 2, str(tmp_path))
    assert rest == ["--width", "8", "--flag"]
    with pytest.raises(SystemExit) as exc:
        hvd_abs.parse_train_args(["--epochs", "many"])
    assert exc.value.code == 2 and "'many' is not a valid integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        hvd_abs.parse_train_args(["--resume", str(tmp_path / "none")])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("Error: --resume")
    # A near miss of a train option would reach the script's parser (argparse even takes
    # abbreviations) while the train option kept its default.
    with pytest.raises(SystemExit) as exc:
        hvd_abs.parse_train_args(["--epoch", "3", "--width", "4"])
    assert exc.value.code == 2 and "--epoch is not an option of hvd-abs train: did you mean --epochs?" in \
        capsys.readouterr().err
    # With the script's own parser: its parse comes back; a clash with a train option is refused
    # (the train option would take the value); a near miss that is its own option is its own.
    import argparse

    own = argparse.ArgumentParser(allow_abbrev=False)
    own.add_argument("--width", type=int, default=16, help="conv channels")
    own.add_argument("--seeds", type=int, default=1)
    cfg, ns = hvd_abs.parse_train_args(["--width", "8", "--seeds", "3", "--lr", "0.5"], parser=own)
    assert (ns.width, ns.seeds, cfg.lr) == (8, 3, 0.5)
    # Its own bad value is a refusal like any other: one Error: line, exit 2.
    named = argparse.ArgumentParser(prog="mine.py")
    named.add_argument("--width", type=int)
    with pytest.raises(SystemExit) as exc:
        hvd_abs.parse_train_args(["--width", "x"], parser=named)
    assert exc.value.code == 2 and capsys.readouterr().err == \
        "Error: mine.py: argument --width: invalid int value: 'x'\n"
    own.add_argument("--lr", type=float)
    with pytest.raises(SystemExit) as exc:
        hvd_abs.parse_train_args(["--lr", "0.5"], parser=own)
    assert exc.value.code == 2 and "own option --lr is also an option of hvd-abs train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        hvd_abs.parse_train_args(["--help"], prog="mine.py", parser=argparse.ArgumentParser(add_help=False))
    assert exc.value.code == 0 and "Options of mine.py itself" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        hvd_abs.parse_train_args(["--help"], prog="mine.py")
    text = " ".join(capsys.readouterr().out.split())  # (click wraps the lines)
    assert exc.value.code == 0 and "Usage: mine.py [OPTIONS]" in text and "--max-batch" in text
    assert "mine.py takes every option of `hvd-abs train`" in text and "lists them with -h" in text


def test_the_example_script_runs_alone_and_refuses_bad_input_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run_checked([sys.executable, str(EXAMPLE), "--method", "absa", "--epochs", "2", "--base-batch", "64",
                        "--eig-samples", "128", "--threads", "1", "--quiet", "--width", "4", "--out", str(out)], timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "SmallNet" and summary["dataset"] == "digits-custom" and summary["epochs"] == 2
    assert "method absa on digits-custom (SmallNet)" in proc.stdout
    import subprocess

    for bad, says in ((["--epochs", "0"], "Error: --epochs must be a positive integer"),
                      (["--width", "x"], "argument --width: invalid int value"),
                      (["--out", str(out)], f"Error: --out {out} already holds a run")):
        p = subprocess.run([sys.executable, str(EXAMPLE), *bad], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_ctrl_c_in_a_script_is_one_line_not_a_traceback(tmp_path):
    import subprocess

    script = tmp_path / "stop.py"
    script.write_text("import hvd_abs\n@hvd_abs.user_errors_exit_2\ndef main():\n    raise KeyboardInterrupt\nmain()\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (130, "Aborted!\n")


def test_launch_horovod_runs_a_script_as_the_workers(tmp_path):
    cmd = build_command(["--out", str(tmp_path), "--width", "4"], min_np=1, max_np=3, script="examples/custom_model.py")
    worker = cmd[cmd.index("--blacklist-cooldown-range") + 3:]
    assert worker == [sys.executable, str(Path("examples/custom_model.py").resolve()), "--elastic", "--max-np", "3",
                      "--out", str(tmp_path), "--width", "4"]
    runner = CliRunner()
    ok = runner.invoke(cli, ["launch", "horovod", "--dry-run", "--script", str(EXAMPLE), "--",
                             "--out", str(tmp_path / "r"), "--width", "4"])
    assert ok.exit_code == 0 and f"{EXAMPLE} --elastic --max-np 4 --out" in ok.output, ok.output
    # A near miss of a train option may be the script's own (--seeds): its workers decide.
    ok = runner.invoke(cli, ["launch", "horovod", "--dry-run", "--script", str(EXAMPLE), "--",
                             "--out", str(tmp_path / "r"), "--seeds", "2"])
    assert ok.exit_code == 0, ok.output
    for args, says in (
            (["--script", str(REPO / "README.md")], "give a Python file (.py)"),
            (["--script", str(tmp_path / "missing.py")], "does not exist"),
            (["--script", str(EXAMPLE), "--", "--epochs", "0"], "--epochs must be a positive integer"),
            (["--script", str(EXAMPLE), "--", "--max-np", "2"], "--max-np among the train options"),
            (["--script", str(EXAMPLE), "--", "--width", "4", "--"], "a second `--` among the train options")):
        if "--" not in args:
            args = [*args, "--"]
        bad = runner.invoke(cli, ["launch", "horovod", "--dry-run", *args, "--out", str(tmp_path / "r")])
        assert bad.exit_code == 2 and says in bad.output and "Traceback" not in bad.output, bad.output


def test_launch_ray_runs_a_script_in_the_actors(tmp_path, monkeypatch):
    seen: dict = {}

    class Recorder:  # stands in for the executor: this test is about what the actors are given
        driver_address, spans_machines = "127.0.0.1", False

        def __init__(self, **kwargs: object) -> None:
            self.env: dict = {}

        def start(self) -> None: ...

        def run(self, fn: object, args: tuple, *, warmup: object) -> list:
            seen["fn"], seen["args"], seen["warmup"] = fn, args, warmup
            return []

        def shutdown(self) -> None: ...

    monkeypatch.setattr(ray_executor, "RayElasticExecutor", Recorder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.py").write_text("")
    result = CliRunner().invoke(cli, ["launch", "ray", "--address", "local", "--max-workers", "2", "--script", "job.py",
                                      "--", "--out=runs/x", "--width", "4"])
    assert result.exit_code == 0, result.output
    assert seen["fn"] is ray_executor.script_worker and seen["warmup"] is ray_executor.warm_script_worker
    assert seen["args"] == (str(tmp_path / "job.py"), str(tmp_path),
                            ["--elastic", "--max-np", "2", f"--out={tmp_path / 'runs' / 'x'}", "--width", "4"])


def test_script_worker_runs_the_script_as_main_from_the_launch_directory(tmp_path):
    script = tmp_path / "code" / "job.py"
    script.parent.mkdir()
    (script.parent / "helper.py").write_text("VALUE = 7\n")
    script.write_text("import json, os, sys\nimport helper\nif __name__ == '__main__':\n"
                      "    json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'value': helper.VALUE},"
                      " open('seen.json', 'w'))\n    sys.exit(int(sys.argv[1]))\n")
    argv, cwd, path = list(sys.argv), os.getcwd(), list(sys.path)
    ray_executor.script_worker(str(script), str(tmp_path), ["0", "--out", "x"])
    assert json.loads((tmp_path / "seen.json").read_text()) == {"argv": ["0", "--out", "x"], "cwd": str(tmp_path),
                                                               "value": 7}
    with pytest.raises(RuntimeError, match="exited with 3"):
        ray_executor.script_worker(str(script), str(tmp_path), ["3"])
    assert (sys.argv, os.getcwd(), sys.path) == (argv, cwd, path)
    sys.modules.pop("helper", None)


BAD_LABELS = """
import torch, hvd_abs
@hvd_abs.user_errors_exit_2
def main():
    cfg, rest = hvd_abs.parse_train_args()
    hvd_abs.splits_from_tensors(torch.zeros(4, 1, 2, 2), torch.tensor([0.0, 1, 0, 1]),
                                torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
main()
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", [["horovod", "--max-np", "2"], ["ray", "--address", "local", "--max-workers", "1"]])
def test_a_worker_refusing_its_input_ends_the_launch_with_its_line(tmp_path, launcher):
    """A --script worker that refuses its data (one Error: line, exit 2) is the launch's outcome:
    that line, exit 2, horovodrun's traceback kept out of sight, no advice to rerun or resume."""
    import subprocess

    script = tmp_path / "bad.py"
    script.write_text(BAD_LABELS)
    proc = subprocess.run([sys.executable, "-m", "hvd_abs", "launch", *launcher, "--script", str(script), "--",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last == "Error: a worker refused its input: train_y is torch.float32: give integer class indices (y.long())"
    assert "Traceback" not in proc.stderr and "--resume" not in proc.stderr, proc.stderr[-3000:]


def test_the_experiment_tracking_example_logs_every_epoch_and_growth(digits, tmp_path) -> None:
    """examples/experiment_tracking.py: a tracker on the callback events, through hvd_abs.fit."""
    import importlib.util

    from hvd_abs.metrics import read_metrics

    spec = importlib.util.spec_from_file_location("experiment_tracking", REPO / "examples" / "experiment_tracking.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    logged = []
    hvd_abs.fit(data=digits, method="abs", growth_trigger="schedule", duration=1, epochs=3,
                base_batch=64, max_batch=256, quiet=True, threads=1, out=str(tmp_path / "run"),
                callbacks=[example.Tracker(lambda metrics, step: logged.append((step, metrics)))])
    epochs, events = read_metrics(tmp_path / "run")
    assert [s for s, m in logged if "train_loss" in m] == [e["updates"] for e in epochs]
    assert [(s, m["growth/new_batch"]) for s, m in logged if "growth/new_batch" in m] == \
        [(g["updates"], g["new_batch"]) for g in events if g["event"] == "growth"]
