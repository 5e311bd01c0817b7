"""The streaming input path: image files decoded when asked for, in the sampler's order, with
augmentation drawn from (seed, epoch, index); equal to the in-memory path, on 1 or 2 workers."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import horovodrun, run_checked
from hvd_abs.data import load_dataset
from hvd_abs.data.loader import StreamLoader
from hvd_abs.data.streaming import ImageFiles, take
from hvd_abs.errors import UserError
from hvd_abs.metrics import read_metrics
from hvd_abs.sampling import EpochSampler
from hvd_abs.testing.image_folder import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ImageNet-like (varied sizes and aspects, JPEG), small enough to decode in moments.
    return make_image_folder(tmp_path_factory.mktemp("folders"), classes=4, train_per_class=16, val_per_class=4,
                             min_side=40, max_side=64)


def _load(folder: Path, tmp_path: Path, loading: str, size: int = 16):
    return load_dataset("imagefolder", folder, cache_dir=tmp_path, image_size=size, loading=loading)


def test_streamed_samples_equal_the_memory_cache_pixel_for_pixel(folder: Path, tmp_path: Path) -> None:
    mem, st = _load(folder, tmp_path, "memory"), _load(folder, tmp_path, "stream")
    assert isinstance(st.train_x, ImageFiles) and isinstance(mem.train_x, torch.Tensor)
    assert st.train_x.shape == tuple(mem.train_x.shape) and st.in_shape == mem.in_shape == (3, 16, 16)
    assert torch.equal(st.train_y, mem.train_y) and torch.equal(st.test_y, mem.test_y)
    idx = torch.tensor([5, 0, 63, 17])
    assert torch.equal(take(st.train_x, idx), take(mem.train_x, idx))
    assert torch.equal(take(st.test_x, torch.arange(16)), take(mem.test_x, torch.arange(16)))
    assert st.mean == mem.mean and st.std == mem.std  # (all 64 images: under the sample limit)


def test_auto_holds_small_folders_in_memory(folder: Path, tmp_path: Path) -> None:
    assert isinstance(_load(folder, tmp_path, "auto").train_x, torch.Tensor)


def test_random_resized_crops_are_a_function_of_seed_epoch_and_index(folder: Path, tmp_path: Path) -> None:
    files = _load(folder, tmp_path, "stream").train_x
    idx = torch.arange(8)
    a = files.load(idx, epoch=2, recipe="rrc-flip")
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, files.load(idx, epoch=2, recipe="rrc-flip"))  # the same draw again
    assert torch.equal(a[3], files.load(torch.tensor([3]), epoch=2, recipe="rrc-flip")[0])  # batch-independent
    assert not torch.equal(a, files.load(idx, epoch=3, recipe="rrc-flip"))  # another epoch, other crops
    assert not torch.equal(a, files.load(idx, epoch=2, recipe="rrc-flip", seed=1))  # another seed, other crops
    assert not torch.equal(a, files.load(idx, recipe="center"))
    assert files.load(idx[:2], recipe="eval").shape == (2, 3, 16, 16)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_follows_the_sampler_across_a_resize_and_an_epoch(folder: Path, tmp_path: Path, workers: int) -> None:
    files = _load(folder, tmp_path, "stream").train_x
    loader = StreamLoader(files, "rrc-flip", workers=workers)
    sampler = EpochSampler(len(files), seed=3)
    served: list[int] = []

    def update(G: int, world: int, rank: int) -> None:
        plan = lambda: sampler.upcoming(G, 4, world, rank)  # noqa: E731
        for micro in list(plan())[: G // 4 // world or 1]:  # (this update's share, before advancing)
            x = loader.get(micro, sampler.epoch, plan)
            assert torch.equal(x, files.load(micro, sampler.epoch, "rrc-flip"))
            served.extend(micro.tolist())
        sampler.advance(G)

    for _ in range(3):
        update(16, 2, 0)  # rank 0 of 2: micro-batches 0 and 2 of each update
    for _ in range(2):
        update(8, 1, 0)  # resized to 1 worker, mid-epoch: the loader's plan restarts here
    perm = sampler.permutation()
    expected = [i for u in range(3) for j in (0, 2) for i in perm[u * 16 + j * 4:u * 16 + j * 4 + 4].tolist()]
    expected += perm[48:64].tolist()
    assert served == expected
    sampler.new_epoch()
    update(16, 1, 0)  # the next epoch: new permutation, new crops
    assert loader.restarts == 2


def test_a_corrupt_image_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, classes=2, train_per_class=3, val_per_class=1, min_side=20, max_side=24)
    files = _load(root, tmp_path, "stream", size=8).train_x
    bad = sorted((root / "train" / "n00000001").iterdir())[1]
    bad.write_bytes(b"not a jpeg")  # (after the load: its statistics' sample reads every file of a small set)
    k = [files.path(i) for i in range(len(files))].index(str(bad))
    for workers in (0, 1):
        loader = StreamLoader(files, "center", workers=workers)
        with pytest.raises(UserError, match=re.escape(f"cannot decode image {bad}")):
            loader.get(torch.tensor([k]), 0, lambda: iter([torch.tensor([k])]))


def test_stream_is_refused_for_array_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--data-loading stream reads image folders"):
        load_dataset("cifar10", tmp_path, loading="stream")


def _args(folder: Path, *extra: str) -> list[str]:
    return ["-m", "hvd_abs", "train", "--dataset", "imagefolder", "--data-dir", str(folder), "--image-size", "16",
            "--model", "cnn", "--method", "abs", "--epochs", "3", "--base-batch", "8", "--batch", "16",
            "--max-batch", "32", "--duration", "1", "--eig-samples", "32", "--lr", "0.05", "--quiet",
            "--threads", "1", *extra]


def test_one_process_streams_what_memory_trains(folder: Path, tmp_path: Path) -> None:
    runs = {}
    for loading in ("memory", "stream"):
        out = tmp_path / loading
        run_checked([sys.executable, *_args(folder, "--data-loading", loading, "--out", str(out))], timeout=120,
                    env={"HVD_ABS_CACHE": str(tmp_path / "cache")})
        runs[loading] = read_metrics(out)[0]
    for a, b in zip(runs["memory"], runs["stream"], strict=True):
        for key in ("global_batch", "train_loss", "test_loss", "test_acc", "eig"):
            assert a[key] == b[key], key  # bit for bit: the same pixels in the same order


@pytest.mark.multiprocess
def test_two_streaming_workers_follow_the_one_process_run(folder: Path, tmp_path: Path) -> None:
    # ImageNet's training crops, decoded in 2 loader processes a worker: still the 1-process run.
    args = _args(folder, "--data-loading", "stream", "--augment", "rrc-flip", "--loader-workers", "2")
    one, two = tmp_path / "np1", tmp_path / "np2"
    run_checked([sys.executable, *args, "--out", str(one)], timeout=120)
    run_checked(horovodrun(2, sys.executable, *args, "--out", str(two)), timeout=180)
    e1, e2 = read_metrics(one)[0], read_metrics(two)[0]
    assert [e["world_size"] for e in e2] == [2, 2, 2]
    assert [e["global_batch"] for e in e2] == [e["global_batch"] for e in e1] == [16, 16, 32]
    for a, b in zip(e1, e2):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


@pytest.mark.multiprocess
def test_an_elastic_job_resizes_mid_epoch_on_the_streaming_path(tmp_path: Path, jobs) -> None:
    """A second worker joins mid-epoch through a standby whose loader processes were started
    ahead, then leaves mid-epoch: every sample once (the ledger), the losses of one process."""
    from conftest import BIN
    from test_elastic_horovod import check_every_sample_once, check_ranks_identical_after_sync, ledger_records

    root = make_image_folder(tmp_path / "data", classes=4, train_per_class=64, val_per_class=4, min_side=40,
                             max_side=64)
    out, single, hostfile = tmp_path / "run", tmp_path / "single", tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n")
    # 16 updates an epoch; sgd at 16 = 2 x 8 wants 2 workers. The job waits after update 6 (mid
    # epoch 1) until a second one runs, after update 24 (mid epoch 2) until one does.
    (out / "ledger").mkdir(parents=True)
    (out / "ledger" / "hold-6-world-2").touch()
    (out / "ledger" / "hold-24-world-1").touch()
    args = ["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16", "--model", "cnn",
            "--method", "sgd", "--epochs", "3", "--base-batch", "8", "--batch", "16", "--lr", "0.05",
            "--data-loading", "stream", "--augment", "rrc-flip", "--loader-workers", "2", "--quiet", "--threads", "1"]
    job = jobs([str(BIN / "hvd-abs"), "launch", "horovod", "--min-np", "1", "--max-np", "2", "--warm", "1",
                "--hostfile", str(hostfile), "--", *args, "--callback", "hvd_abs.testing.ledger:Ledger",
                "--commit-every", "1", "--out", str(out)], tmp_path / "job.log")
    joined = left = False
    deadline = time.time() + 240
    while time.time() < deadline and job.proc.poll() is None:
        records = ledger_records(out)
        if not joined and any(r["update"] >= 3 for r in records):
            hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # (a slot joins the pool)
            joined = True
        if not left and any(r["world_size"] == 2 and r["update"] > 20 for r in records):
            tmp = hostfile.with_suffix(".tmp")  # whole or not at all: discovery polls it
            tmp.write_text("localhost slots=1\n")
            tmp.replace(hostfile)
            left = True
        time.sleep(0.2)
    assert job.wait(timeout=max(1.0, deadline - time.time())) == 0, job.output()[-6000:]
    run_checked([sys.executable, "-m", "hvd_abs", "train", *args, "--out", str(single)], timeout=120)

    epochs, events = read_metrics(out)
    assert [e["world_size"] for e in events if e["event"] == "resize"] == [2, 1]
    check_every_sample_once(out)
    check_ranks_identical_after_sync(out)
    joiners = [r for r in ledger_records(out) if r["rank"] == 1]
    assert joiners and all(r["warm_loader"] for r in joiners)  # the standby's loader processes served it
    for a, b in zip(read_metrics(single)[0], epochs, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


class Noisy(torch.utils.data.Dataset):
    """A user's data set with random transforms drawn from torch's, numpy's and Python's global RNGs."""

    def __init__(self, n: int = 40, uint8: bool = False) -> None:
        gen = torch.Generator().manual_seed(5)
        self.x = torch.rand(n, 3, 8, 8, generator=gen)
        self.targets = torch.arange(n) % 4
        self.uint8 = uint8

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        import random

        import numpy as np

        x = self.x[i] + 0.1 * torch.rand(1) + float(np.random.rand()) * 0.01 + random.random() * 0.001
        x = x.flip(-1) if torch.rand(()) < 0.5 else x
        return ((x.clamp(0, 1) * 255).to(torch.uint8) if self.uint8 else x.clamp(0, 1)), int(self.targets[i])


def test_a_datasets_random_transforms_stream_from_seed_epoch_and_index() -> None:
    import hvd_abs

    ds = Noisy()
    data = hvd_abs.splits_from_datasets(ds, Noisy(8), loading="stream")
    assert torch.equal(data.train_y, ds.targets) and data.in_shape == (3, 8, 8) and data.num_classes == 4
    files = data.train_x
    idx = torch.tensor([3, 0, 17])
    rng = torch.random.get_rng_state()
    a = files.load(idx, epoch=1, seed=2)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the trainer's own stream is untouched
    assert torch.equal(a, files.load(idx, epoch=1, seed=2))  # the same draws again
    assert torch.equal(a[1], files.load(torch.tensor([0]), epoch=1, seed=2)[0])  # batch-independent
    assert not torch.equal(a, files.load(idx, epoch=2, seed=2)) and not torch.equal(a, files.load(idx, epoch=1))
    sub = files.select(torch.tensor([17, 3]))  # (a --train-subset: the samples and their labels, in that order)
    assert torch.equal(sub.labels, ds.targets[[17, 3]]) and sub.shape == (2, 3, 8, 8)
    # Read ahead by 2 loader processes: the same samples as read in this process.
    sampler = EpochSampler(len(files), seed=0)
    loader = StreamLoader(files, "center", workers=2, seed=2)
    plan = lambda: sampler.upcoming(8, 4, 1, 0)  # noqa: E731
    for micro in list(plan()):
        assert torch.equal(loader.get(micro, 0, plan), files.load(micro, 0, seed=2))
    # auto: a small set is held in memory (uint8 as given).
    held = hvd_abs.splits_from_datasets(Noisy(uint8=True), Noisy(8, uint8=True))
    assert isinstance(held.train_x, torch.Tensor) and held.train_x.shape == (40, 3, 8, 8)


def test_a_streamed_dataset_trains_as_the_memory_path(tmp_path: Path) -> None:
    import hvd_abs

    class Plain(torch.utils.data.Dataset):  # no random transforms: memory and stream see the same inputs
        def __init__(self, x, y) -> None:
            self.x, self.y = x, y

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int):
            return self.x[i], int(self.y[i])  # (no .targets: the labels are read once)

    d = hvd_abs.load_dataset("digits")
    runs = {}
    for loading in ("memory", "stream"):
        data = hvd_abs.splits_from_datasets(Plain(d.train_x, d.train_y), Plain(d.test_x, d.test_y), loading=loading)
        out = tmp_path / loading
        hvd_abs.fit(model=None, data=data, echo=False, method="abs", epochs=2, batch=32, base_batch=16,
                    max_batch=64, duration=1, eig_samples=64, threads=1, loader_workers=2, out=str(out))
        runs[loading] = read_metrics(out)[0]
    assert isinstance(data.train_x, hvd_abs.data.streaming.Streamed)
    for a, b in zip(runs["memory"], runs["stream"], strict=True):
        for key in ("global_batch", "train_loss", "test_loss", "test_acc", "eig"):
            assert a[key] == b[key], key  # bit for bit


@pytest.mark.parametrize("change, message", [
    (lambda ds: setattr(ds, "targets", (ds.targets + 1) % 4), "sample 0 .* has label 1, but its targets say 0"),
    (lambda ds: setattr(ds, "x", [*ds.x[:5], torch.zeros(3, 4, 4), *ds.x[6:]]), "sample 5 .* one shape and dtype"),
])
def test_a_streamed_dataset_refuses_what_would_be_a_silent_wrong_sample(change, message) -> None:
    import hvd_abs

    ds = Noisy()
    data = hvd_abs.splits_from_datasets(ds, Noisy(8), loading="stream")
    change(ds)
    with pytest.raises(UserError, match=message):
        data.train_x.load(torch.arange(8))


def test_decode_time_crops_and_unscaled_inputs_are_refused_for_a_datasets_samples(tmp_path: Path) -> None:
    import hvd_abs

    data = hvd_abs.splits_from_datasets(Noisy(), Noisy(8), loading="stream")
    with pytest.raises(UserError, match="put RandomResizedCrop in its transforms"):
        hvd_abs.fit(data=data, echo=False, augment="rrc-flip", epochs=1, batch=8, out=str(tmp_path / "x"))

    class Normalised(Noisy):  # mean/std applied in the data set: FGSM's [0, 1] clamp would cut it
        def __getitem__(self, i: int):
            x, y = super().__getitem__(i)
            return (x - 0.5) / 0.25, y

    data = hvd_abs.splits_from_datasets(Normalised(), Normalised(8), loading="stream")
    with pytest.raises(UserError, match=r"absa needs inputs in \[0, 1\]"):
        hvd_abs.fit(data=data, echo=False, method="absa", epochs=1, batch=8, out=str(tmp_path / "y"))


def test_read_rgb_gives_pillows_pixels_and_reduces_large_jpegs(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from hvd_abs.data.decode import read_rgb

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    files = {"rgb.jpg": Image.fromarray(pixels), "grey.jpg": Image.fromarray(pixels[..., 0]),
             "rgb.png": Image.fromarray(pixels), "cmyk.jpg": Image.fromarray(pixels).convert("CMYK")}
    for name, im in files.items():
        im.save(tmp_path / name)
        got, scale = read_rgb(str(tmp_path / name))
        want = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert got.shape == (3, 120, 160) and scale == (1.0, 1.0)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), want), name  # (torchvision.io or Pillow: one image)
    small, scale = read_rgb(str(tmp_path / "rgb.jpg"), lambda W, H: (40, 30))  # a quarter across is enough
    assert small.shape == (3, 30, 40) and scale == (0.25, 0.25)
    assert read_rgb(str(tmp_path / "rgb.jpg"), lambda W, H: (100, 80))[0].shape == (3, 120, 160)  # (not 2x)
