"""hvd_abs.data: digits, image folders and their tensor cache, torchvision errors.

Image folders here are a few generated PNG/JPEG files in tmp_path; nothing decodes the shared
60,000-image CIFAR-10 (benchmarks may).
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hvd_abs import data
from hvd_abs.data import Splits, decode, load_dataset, sources
from hvd_abs.data.streaming import take
from hvd_abs.errors import UserError

CLASSES = ("bird", "cat", "dog")  # sorted: labels 0, 1, 2


def _pixel(label: int, i: int, size: int = 6) -> np.ndarray:
    """A distinct, deterministic RGB image per (label, index): (size, size, 3) uint8."""
    rng = np.random.default_rng(1000 * label + i)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_folder(root: Path, n_train: int = 4, n_test: int = 2, classes: tuple[str, ...] = CLASSES,
                 ext: str = ".png") -> Path:
    for label, c in enumerate(classes):
        for i in range(n_train):
            _write(root / "train" / c / f"{i:03d}{ext}", _pixel(label, i))
        for i in range(n_test):
            _write(root / "test" / c / f"{i:03d}{ext}", _pixel(label, 100 + i))
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _make_folder(tmp_path / "data")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def decode_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the decoder (one per split): a cache hit decodes nothing."""
    calls: list[int] = []
    real = decode._decode_files

    def spy(paths: list[str], image_size: int | None) -> torch.Tensor:
        calls.append(len(paths))
        return real(paths, image_size)

    monkeypatch.setattr(sources, "_decode_files", spy)
    return calls


def _cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "datasets").glob("*.pt"))


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_ranges_labels() -> None:
    s = load_dataset("digits")
    assert isinstance(s, Splits) and s.name == "digits"
    assert s.train_x.shape == (1437, 1, 8, 8) and s.test_x.shape == (360, 1, 8, 8)
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    assert 0.0 <= float(s.train_x.min()) and float(s.train_x.max()) == 1.0  # 16 / 16
    assert s.num_classes == 10 and s.in_shape == (1, 8, 8)
    assert set(s.train_y.tolist()) == set(range(10)) == set(s.test_y.tolist())
    # Stratified: each class has 36 (+-1) of the 360 test images.
    counts = torch.bincount(s.test_y, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    assert len(s.mean) == len(s.std) == 1
    assert s.mean[0] == pytest.approx(float(s.train_x.mean()), rel=1e-5)
    assert s.std[0] == pytest.approx(float(s.train_x.std(correction=0)), rel=1e-5)
    assert "1437" in repr(s) and len(repr(s)) < 200


def test_digits_split_is_deterministic() -> None:
    a, b = load_dataset("digits"), load_dataset("DIGITS")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    # Train and test are disjoint pieces of the 1,797 images: together, each image once.
    assert len(a.train_y) + len(a.test_y) == 1797
    every = torch.cat([a.train_x, a.test_x]).flatten(1)
    assert torch.unique(every, dim=0).shape[0] == torch.unique(every[:len(a.train_y)], dim=0).shape[0] + \
        torch.unique(every[len(a.train_y):], dim=0).shape[0]


def test_digits_resize() -> None:
    s = load_dataset("digits", image_size=16)
    assert s.train_x.shape == (1437, 1, 16, 16) and s.in_shape == (1, 16, 16)
    assert 0.0 <= float(s.train_x.min()) and float(s.train_x.max()) <= 1.0


# --- image folders ----------------------------------------------------------------------------


def test_imagefolder_loads_exact_pixels_and_labels(folder: Path, cache: Path) -> None:
    s = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    assert s.classes == CLASSES and s.num_classes == 3 and s.in_shape == (3, 6, 6)
    assert s.train_x.shape == (12, 3, 6, 6) and s.test_x.shape == (6, 3, 6, 6)
    assert s.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert s.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    # PNG is lossless: pixels come back exactly, held as uint8, channels first, and [0, 1] floats per batch.
    want = torch.from_numpy(_pixel(1, 2)).permute(2, 0, 1)
    assert s.train_x.dtype == torch.uint8 and torch.equal(s.train_x[4 + 2], want)
    assert torch.equal(take(s.train_x, torch.tensor([4 + 2]))[0], want.float() / 255)
    assert s.mean == pytest.approx(tuple((s.train_x.float() / 255).mean(dim=(0, 2, 3)).tolist()), rel=1e-5)


def test_imagefolder_second_load_hits_cache(folder: Path, cache: Path, decode_spy: list[int]) -> None:
    a = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    assert decode_spy == [12, 6]
    assert len(_cache_files(cache)) == 1
    b = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    assert decode_spy == [12, 6], "second load decoded again instead of reading the cache"
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y) and a.classes == b.classes
    # The same folder as --dataset cifar10 would share the entry; here 3 classes are refused instead.
    with pytest.raises(UserError, match="expects 10 classes"):
        load_dataset("cifar10", data_dir=folder, cache_dir=cache)


def test_cache_dir_from_environment(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVD_ABS_CACHE", str(tmp_path / "envcache"))
    load_dataset("imagefolder", data_dir=folder)
    assert len(_cache_files(tmp_path / "envcache")) == 1


def test_changed_folder_rebuilds(folder: Path, cache: Path, decode_spy: list[int]) -> None:
    load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    _write(folder / "train" / "cat" / "new.png", _pixel(1, 50))
    s = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    assert decode_spy == [12, 6, 13, 6] and len(s.train_y) == 13


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_corrupt_cache_file_is_rebuilt(folder: Path, cache: Path, decode_spy: list[int], damage: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    a = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    (path,) = _cache_files(cache)
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"not a torch file" * 10, "truncate": raw[: len(raw) // 2], "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="hvd_abs.data"):
        b = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    assert "rebuilding" in caplog.text
    assert decode_spy == [12, 6, 12, 6]
    assert torch.equal(a.train_x, b.train_x)
    # The rebuilt file is whole again: a third load reads it.
    load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    assert decode_spy == [12, 6, 12, 6]


def test_cache_with_altered_pixels_fails_checksum(folder: Path, cache: Path, decode_spy: list[int]) -> None:
    a = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    (path,) = _cache_files(cache)
    blob = torch.load(path, weights_only=True)
    blob["train_x"][0, 0, 0, 0] ^= 1  # a well-formed file whose data no longer match its checksum
    torch.save(blob, path)
    b = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    assert decode_spy == [12, 6, 12, 6] and torch.equal(a.train_x, b.train_x)


def _tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_read_only_data_dir(folder: Path, cache: Path) -> None:
    before = _tree(folder)
    paths = [folder, *folder.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        s = load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
        assert len(s.train_y) == 12 and len(_cache_files(cache)) == 1
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    # Root ignores permission bits, so also check that nothing in the data folder changed.
    assert _tree(folder) == before


def test_unwritable_cache_dir_still_loads(folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="hvd_abs.data"):
        s = load_dataset("imagefolder", data_dir=folder, cache_dir=blocker)
    assert len(s.train_y) == 12
    assert "could not write dataset cache" in caplog.text


def test_no_temp_files_left_behind(folder: Path, cache: Path) -> None:
    load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    assert not [p for p in (cache / "datasets").iterdir() if p.name.endswith(".tmp")]


def test_jpeg_and_resize(tmp_path: Path, cache: Path) -> None:
    root = _make_folder(tmp_path / "jpg", ext=".jpg")
    s = load_dataset("imagefolder", data_dir=root, cache_dir=cache)
    assert s.train_x.shape == (12, 3, 6, 6)
    r = load_dataset("imagefolder", data_dir=root, cache_dir=cache, image_size=4)
    assert r.train_x.shape == (12, 3, 4, 4) and r.in_shape == (3, 4, 4)
    assert len(_cache_files(cache)) == 2  # the size is part of the key


def test_mixed_sizes_need_image_size(folder: Path, cache: Path) -> None:
    _write(folder / "train" / "dog" / "big.png", np.zeros((10, 14, 3), np.uint8))
    with pytest.raises(UserError, match="image size"):
        load_dataset("imagefolder", data_dir=folder, cache_dir=cache)
    s = load_dataset("imagefolder", data_dir=folder, cache_dir=cache, image_size=5)
    assert s.train_x.shape == (13, 3, 5, 5)


def test_grey_and_palette_images_become_rgb(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "modes"
    Image.fromarray(np.full((6, 6), 200, np.uint8)).save(_mkparent(root / "train" / "a" / "0.png"))  # mode L
    Image.fromarray(_pixel(0, 0)).convert("P").save(_mkparent(root / "test" / "a" / "0.png"))
    s = load_dataset("imagefolder", data_dir=root, cache_dir=cache)
    assert s.train_x.shape == (1, 3, 6, 6)
    assert torch.equal(s.train_x, torch.full_like(s.train_x, 200))
    assert s.test_x.shape == (1, 3, 6, 6)  # the palette image, as PIL's own RGB conversion gives it
    rgb = np.asarray(Image.open(root / "test" / "a" / "0.png").convert("RGB"))
    assert torch.equal(s.test_x[0], torch.from_numpy(rgb.copy()).permute(2, 0, 1))


def _mkparent(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def test_tiny_imagenet_layout(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "tiny"
    wnids = ("n01", "n02")
    for label, w in enumerate(wnids):
        for i in range(3):
            _write(root / "train" / w / "images" / f"{w}_{i}.JPEG", _pixel(label, i))
    lines = []
    for i, w in enumerate(("n02", "n01", "n02")):
        _write(root / "val" / "images" / f"val_{i}.JPEG", _pixel(0, 200 + i))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t5\t5")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _write(root / "test" / "images" / "test_0.JPEG", _pixel(0, 300))  # unlabelled: must be skipped
    s = load_dataset("imagefolder", data_dir=root, cache_dir=cache)
    assert s.classes == wnids and s.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.test_y.tolist() == [1, 0, 1]


def test_cifar10_name_accepts_image_folder(tmp_path: Path, cache: Path) -> None:
    names = tuple(f"c{i}" for i in range(10))
    root = _make_folder(tmp_path / "c10", n_train=1, n_test=1, classes=names, ext=".jpg")
    s = load_dataset("cifar10", data_dir=root, cache_dir=cache)
    assert s.name == "cifar10" and s.num_classes == 10 and s.classes == names
    assert s.train_x.shape == (10, 3, 6, 6)


def test_threaded_decoding_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_folder(tmp_path / "pool", n_train=20, n_test=4)
    serial = load_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "c1")
    monkeypatch.setenv("HVD_ABS_DECODE_WORKERS", "2")
    monkeypatch.setattr(decode, "_FILES_PER_WORKER", 1)
    threaded = load_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "c2")
    assert torch.equal(serial.train_x, threaded.train_x) and torch.equal(serial.train_y, threaded.train_y)


def test_threaded_decoding_reports_a_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_folder(tmp_path / "bad", n_train=6, n_test=1)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    monkeypatch.setenv("HVD_ABS_DECODE_WORKERS", "2")
    monkeypatch.setattr(decode, "_FILES_PER_WORKER", 1)
    with pytest.raises(UserError, match="broken.png"):
        load_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "c")


# --- errors -----------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UserError) as e:
        load_dataset("mnist")
    for name in data.DATASETS:
        assert name in str(e.value)


def test_imagefolder_needs_data_dir() -> None:
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("imagefolder")


def test_missing_data_dir_names_the_path(tmp_path: Path, cache: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", data_dir=missing, cache_dir=cache)
    assert str(missing) in str(e.value) and "--data-dir" in str(e.value)


def test_folder_without_train_split(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "flat").mkdir()
    _write(tmp_path / "flat" / "x.png", _pixel(0, 0))
    with pytest.raises(UserError, match="train/<class>"):
        load_dataset("imagefolder", data_dir=tmp_path / "flat", cache_dir=cache)


def test_folder_without_eval_split(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "trainonly"
    _write(root / "train" / "a" / "0.png", _pixel(0, 0))
    with pytest.raises(UserError, match="evaluation split"):
        load_dataset("imagefolder", data_dir=root, cache_dir=cache)


def test_eval_class_missing_from_train(folder: Path, cache: Path) -> None:
    _write(folder / "test" / "zebra" / "0.png", _pixel(9, 0))
    with pytest.raises(UserError, match="zebra"):
        load_dataset("imagefolder", data_dir=folder, cache_dir=cache)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_torchvision_missing_without_download(name: str, tmp_path: Path) -> None:
    # download=False: the caller (hvd-abs train) has a --download option, so the message offers it.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        load_dataset(name, data_dir=empty, cache_dir=tmp_path / "cache", download=False)
    msg = str(e.value)
    assert "--download" in msg and "--data-dir" in msg and str(empty) in msg
    assert os.listdir(empty) == []  # nothing fetched without --download


def test_torchvision_missing_names_only_data_dir_by_default(tmp_path: Path) -> None:
    # The default is for callers without --download (hessian, the benchmarks): advice they can follow.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", data_dir=empty, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "--data-dir" in msg and str(empty) in msg and "--download" not in msg
    assert os.listdir(empty) == []


def test_torchvision_default_root_is_under_cache(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cache" / "data") in str(e.value)


def test_bad_image_size() -> None:
    with pytest.raises(UserError, match="image size"):
        load_dataset("digits", image_size=0)
