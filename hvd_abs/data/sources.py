"""The named data sets and load_dataset's dispatch among them: digits, torchvision's, image folders."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hvd_abs.data.cache import CACHE_FORMAT, _cache_key, _checksums, _read_cache, _write_cache, default_cache_dir
from hvd_abs.data.decode import _decode_files, first_image_size
from hvd_abs.data.image_folder import _looks_like_image_folder, _scan_image_folder
from hvd_abs.data.splits import Splits, _finish
from hvd_abs.errors import UserError
from hvd_abs.locks import cache_lock

# The package's one logger name, as before the split (log formats show %(name)s).
log = logging.getLogger("hvd_abs.data")

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "svhn", "imagefolder")
"""Names accepted by load_dataset."""

_TORCHVISION_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}

_DIGITS_TEST = 360  # 1797 - 360 = 1437 training images, stratified


LOADINGS: tuple[str, ...] = ("auto", "memory", "stream")
"""How an image folder is held: auto (memory when its decoded images fit, else stream), or forced."""


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, image_size: int | None = None,
                 loading: str = "memory") -> Splits:
    """Load a data set's train and test splits into memory.

    Args:
        name: one of DATASETS.
        data_dir: where the data live. Required for imagefolder. For cifar10/cifar100/svhn, either a
            torchvision root or an ImageFolder tree (train/ and test/ class folders); default
            <cache root>/data for the torchvision copies.
        download: fetch a missing torchvision data set. False: the caller has a --download option
            that was not given (a missing data set is an error that suggests it); None (the default):
            the caller has no such option (the error suggests only --data-dir).
        cache_dir: root of the decoded-image cache (default $HVD_ABS_CACHE, else ~/.cache/hvd_abs).
        image_size: resize every image to image_size x image_size (default None: keep the native size;
            an image folder then needs all images of one size). Folders are resized on the shorter
            side and centre-cropped; tensor sources are resized whole.
        loading: for image folders, memory (decoded once into a cached uint8 tensor), stream (files
            read when their samples are asked for: hvd_abs.data.streaming), or auto (memory when the
            decoded images would take under a quarter of the available RAM and 8 GiB). Other
            sources are small arrays, always in memory.

    Raises:
        UserError: unknown name, missing data, or a malformed folder; the message says what to pass.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if loading not in LOADINGS:
        raise UserError(f"--data-loading must be one of {', '.join(LOADINGS)}, got {loading!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a positive integer, got {image_size!r}")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = Path(data_dir).expanduser() if data_dir is not None else None

    if key == "digits":
        if root is not None:
            log.info("digits is bundled with scikit-learn: ignoring data_dir=%s", root)
        return _finish(key, *_load_digits(), image_size=image_size)

    if key == "imagefolder":
        if root is None:
            raise UserError("--dataset imagefolder needs --data-dir PATH, a folder with train/<class>/* "
                            "and test/<class>/* (or val/<class>/*) image files")
        return _folder(key, root, cache_root, image_size, loading, None)

    # cifar10 / cifar100 / svhn: an ImageFolder tree when data_dir has one, else torchvision's files.
    if root is not None and _looks_like_image_folder(root):
        return _folder(key, root, cache_root, image_size, loading, _TORCHVISION_CLASSES[key])
    if loading == "stream":
        raise UserError(f"--data-loading stream reads image folders; {key}'s arrays are held in memory: pass "
                        f"--data-dir with an image folder, or --data-loading auto")
    tv_root = root if root is not None else cache_root / "data"
    return _finish(key, *_load_torchvision(key, tv_root, download), image_size=image_size)


# ---------------------------------------------------------------------------------------------
# Sources. Each returns (train_x, train_y, test_x, test_y, classes); x is uint8 (0..255) or float
# in [0, 1], (N, C, H, W); _finish converts and checks.


def _load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy((bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32))  # (1797, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    # A fixed seed and stratification: every process and every run sees the same split.
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=_DIGITS_TEST, stratify=bunch.target,
                                           random_state=0)
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    classes = tuple(str(c) for c in bunch.target_names)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes


def _load_torchvision(name: str, root: Path, download: bool | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    # These ship as a few array files (pickles, .mat) that load in seconds: no decode cache needed.
    import torchvision.datasets as tvd

    pretty = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}[name]
    if download:
        log.info("%s: downloading into %s if missing", pretty, root)
    try:
        if name == "svhn":
            train, test = (tvd.SVHN(str(root), split=s, download=bool(download)) for s in ("train", "test"))
            train_x, test_x = (torch.from_numpy(d.data) for d in (train, test))  # (N, 3, 32, 32) uint8
            train_y, test_y = (torch.from_numpy(np.asarray(d.labels, dtype=np.int64)) for d in (train, test))
            classes = tuple(str(i) for i in range(10))
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            train, test = (cls(str(root), train=t, download=bool(download)) for t in (True, False))
            # (N, 32, 32, 3) -> (N, 3, 32, 32)
            train_x, test_x = (torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous() for d in (train, test))
            train_y, test_y = (torch.tensor(d.targets, dtype=torch.int64) for d in (train, test))
            classes = tuple(train.classes)
    except RuntimeError as exc:
        # torchvision's "Dataset not found or corrupted. You can use download=True to download it".
        if download:
            raise UserError(f"{pretty} under {root} is unusable after download ({exc}); delete it and retry "
                            f"with --download, or pass --data-dir with a good copy") from exc
        # Name only options the caller has: hessian and the benchmarks have no --download.
        fetch = "pass --download to fetch it there, or " if download is False else "pass "
        raise UserError(f"{pretty} not found under {root}: {fetch}--data-dir PATH with an existing copy "
                        f"(torchvision's files, or an image folder with train/<class>/* and test/<class>/*)") from exc
    except OSError as exc:  # urllib's URLError is an OSError: no network, bad proxy, read-only root
        raise UserError(f"could not download {pretty} into {root} ({exc}); check the network and that the "
                        f"folder is writable, or pass --data-dir with an existing copy") from exc
    return train_x, train_y, test_x, test_y, classes


def _folder(key: str, root: Path, cache_root: Path, image_size: int | None, loading: str,
            expected: int | None) -> Splits:
    root = root.expanduser()
    train, evaluation, classes, eval_name = _scan_image_folder(root)
    if expected is not None and len(classes) != expected:
        raise UserError(f"--dataset {key} expects {expected} classes but {root / 'train'} has {len(classes)}; "
                        f"use --dataset imagefolder for other folders")
    size = (image_size, image_size) if image_size is not None else first_image_size(train.paths[0])
    if loading == "auto":
        need = (len(train.paths) + len(evaluation.paths)) * 3 * size[0] * size[1]
        loading = "memory" if need <= _memory_budget() else "stream"
        log.info("image folder %s: %.1f GB decoded, %s (--data-loading auto)", root, need / 1e9,
                 "held in memory" if loading == "memory" else "streamed from the files")
    if loading == "stream":
        return _stream_splits(key, train, evaluation, classes, size)
    return _finish(key, *_load_image_folder(root, cache_root, image_size, (train, evaluation, classes, eval_name)),
                   image_size=None)


def _memory_budget() -> int:
    """Bytes of decoded images held in memory under --data-loading auto: a quarter of the host's
    RAM (several workers share a host), at most 8 GiB. The total, not what is free now: every
    rank of a host must make the same choice, however far the others have loaded."""
    total = 32 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(8 << 30, total // 4)


def _stream_splits(key: str, train: Any, evaluation: Any, classes: list[str], size: tuple[int, int]) -> Splits:
    from hvd_abs.data.streaming import ImageFiles, sample_stats

    train_x, test_x = ImageFiles(train.paths, size), ImageFiles(evaluation.paths, size)
    mean, std = sample_stats(train_x)
    log.info("dataset %s: %d train, %d test, %d classes, images 3x%dx%d, streamed", key, len(train_x), len(test_x),
             len(classes), *size)
    return Splits(train_x=train_x, train_y=torch.tensor(train.labels, dtype=torch.int64), test_x=test_x,
                  test_y=torch.tensor(evaluation.labels, dtype=torch.int64), num_classes=len(classes),
                  in_shape=(3, *size), mean=mean, std=std, name=key, classes=tuple(classes))


def _load_image_folder(root: Path, cache_root: Path, image_size: int | None, scanned: tuple[Any, Any, list[str], str]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    train, evaluation, classes, eval_name = scanned
    key = _cache_key(root, image_size, train, evaluation)
    path = cache_root / "datasets" / f"{key}.pt"
    log.info("image folder %s: %d train, %d %s images, %d classes; cache %s", root,
             len(train.paths), len(evaluation.paths), eval_name, len(classes), path)

    with cache_lock(path):
        blob = _read_cache(path, key)
        if blob is None:
            t1 = time.perf_counter()
            train_x = _decode_files(train.paths, image_size)
            test_x = _decode_files(evaluation.paths, image_size)
            if tuple(train_x.shape[1:]) != tuple(test_x.shape[1:]):
                raise UserError(f"train images are {tuple(train_x.shape[2:])} but {eval_name} images are "
                                f"{tuple(test_x.shape[2:])} in {root}; pass an image size to resize both")
            log.info("decoded %d images in %.1fs", len(train.paths) + len(evaluation.paths),
                     time.perf_counter() - t1)
            blob = {
                "format": CACHE_FORMAT, "key": key, "classes": list(classes),
                "train_x": train_x, "train_y": torch.tensor(train.labels, dtype=torch.int64),
                "test_x": test_x, "test_y": torch.tensor(evaluation.labels, dtype=torch.int64),
            }
            blob["crc32"] = _checksums(blob)
            _write_cache(path, blob)
    return blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], tuple(blob["classes"])
