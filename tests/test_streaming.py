"""The streaming input path: image files decoded when asked for, in the sampler's order, with
augmentation drawn from (seed, epoch, index); equal to the in-memory path, on 1 or 2 workers."""
from __future__ import annotations

import re
import sys
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
