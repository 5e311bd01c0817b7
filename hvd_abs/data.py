"""Data sets as in-memory tensors: train and test splits of [0, 1] images with integer labels.

Every loader returns float32 images of shape (N, C, H, W) with values in [0, 1], never normalised:
the models normalise inside (hvd_abs.models), so FGSM's eps stays on the [0, 1] pixel scale.

Sources:
  digits       scikit-learn's bundled 8x8 handwritten digits (offline; the default)
  cifar10      torchvision's CIFAR-10, or an ImageFolder tree given with data_dir
  cifar100     torchvision's CIFAR-100, or an ImageFolder tree given with data_dir
  svhn         torchvision's SVHN, or an ImageFolder tree given with data_dir
  imagefolder  data_dir/train/<class>/* and data_dir/{test,val}/<class>/* (Tiny-ImageNet's
               val/images + val_annotations.txt is understood too)

Image folders are decoded once, in parallel, into a uint8 tensor cache
(<cache dir>/datasets/<key>.pt, written atomically) and later loads read that file, so decoding
is never the bottleneck of a run. The key covers the folder's path, the image size and the file
list (count, total size, newest mtime, and the relative paths), so changing the data rebuilds it.
The data folder itself is only read, never written: it may be read-only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hvd_abs.atomic import write_atomic
from hvd_abs.errors import UserError
from hvd_abs.locks import cache_lock

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "svhn", "imagefolder")
"""Names accepted by load_dataset."""

# Bump when the cache file's contents or the decoding change: old files then miss the key.
CACHE_FORMAT = 1

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# Folder names tried, in order, for the evaluation split of an image folder. ImageNet and
# Tiny-ImageNet ship labelled "val" folders; Tiny-ImageNet's "test" has no labels.
_EVAL_SPLITS: tuple[str, ...] = ("test", "val")

_TORCHVISION_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}

_DIGITS_TEST = 360  # 1797 - 360 = 1437 training images, stratified


@dataclasses.dataclass
class Splits:
    """A data set held in memory.

    train_x, test_x: float32 (N, C, H, W) in [0, 1], not normalised.
    train_y, test_y: int64 (N,) class indices in [0, num_classes).
    mean, std: per-channel statistics of train_x (population std), for the model's input layer.
    classes: class names in label order (empty where the source has none).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    classes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        # The default dataclass repr would print every pixel.
        return (f"Splits(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
                f"num_classes={self.num_classes}, in_shape={self.in_shape})")


def default_cache_dir() -> Path:
    """The user cache root: $HVD_ABS_CACHE, else ~/.cache/hvd_abs."""
    env = os.environ.get("HVD_ABS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hvd_abs"


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, image_size: int | None = None) -> Splits:
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

    Raises:
        UserError: unknown name, missing data, or a malformed folder; the message says what to pass.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
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
        return _finish(key, *_load_image_folder(root, cache_root, image_size), image_size=None)

    # cifar10 / cifar100 / svhn: an ImageFolder tree when data_dir has one, else torchvision's files.
    if root is not None and _looks_like_image_folder(root):
        train_x, train_y, test_x, test_y, classes = _load_image_folder(root, cache_root, image_size)
        expected = _TORCHVISION_CLASSES[key]
        if len(classes) != expected:
            raise UserError(f"--dataset {key} expects {expected} classes but {root / 'train'} has {len(classes)}; "
                            f"use --dataset imagefolder for other folders")
        return _finish(key, train_x, train_y, test_x, test_y, classes, image_size=None)
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


def _finish(name: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
            classes: tuple[str, ...], *, image_size: int | None) -> Splits:
    """uint8 or float images -> float32 [0, 1], optional whole-image resize, statistics."""
    train_x, test_x = _to_unit_float(train_x), _to_unit_float(test_x)
    if image_size is not None and tuple(train_x.shape[-2:]) != (image_size, image_size):
        train_x, test_x = _resize_tensor(train_x, image_size), _resize_tensor(test_x, image_size)
    mean, std = channel_stats(train_x)
    num_classes = len(classes) if classes else int(max(train_y.max(), test_y.max())) + 1
    c, h, w = train_x.shape[1:]
    log.info("dataset %s: %d train, %d test, %d classes, images %dx%dx%d", name, len(train_y), len(test_y),
             num_classes, c, h, w)
    return Splits(train_x=train_x, train_y=train_y.long(), test_x=test_x, test_y=test_y.long(),
                  num_classes=num_classes, in_shape=(int(c), int(h), int(w)), mean=mean, std=std, name=name,
                  classes=tuple(classes))


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _resize_tensor(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    # Chunked so a large set does not need a second full-size temporary per op.
    import torch.nn.functional as F

    out = [F.interpolate(x[i:i + chunk], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0) for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else x.new_empty((0, x.shape[1], size, size))


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of x (N, C, H, W).

    torch.var_mean reduces in one multi-threaded pass with a stable algorithm: within 1e-5 of a
    float64 computation on CIFAR-10, about twice as fast as accumulating float64 chunks.
    """
    if x.numel() == 0:
        return tuple(0.0 for _ in range(x.shape[1])), tuple(1.0 for _ in range(x.shape[1]))
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in var.sqrt())


# ---------------------------------------------------------------------------------------------
# Image folders.


@dataclasses.dataclass
class _Split:
    paths: list[str]
    labels: list[int]


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _looks_like_image_folder(root: Path) -> bool:
    train = root / "train"
    return train.is_dir() and bool(_class_dirs(train)) and any((root / s).is_dir() for s in _EVAL_SPLITS)


def _image_files(folder: Path) -> Iterator[str]:
    # Recursive, so ImageNet-style train/<class>/*.JPEG and Tiny-ImageNet's train/<class>/images/* both work.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                yield os.path.join(dirpath, f)


def _scan_class_split(split_dir: Path, classes: list[str]) -> _Split:
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for c in _class_dirs(split_dir):
        if c not in index:
            raise UserError(f"{split_dir / c} is a class that {split_dir.parent / 'train'} lacks; "
                            f"the evaluation split's classes must be a subset of the training classes")
        files = list(_image_files(split_dir / c))
        paths += files
        labels += [index[c]] * len(files)
    return _Split(paths, labels)


def _scan_annotated_split(split_dir: Path, classes: list[str]) -> _Split:
    """Tiny-ImageNet's val/: images/<file> with labels in val_annotations.txt (file<TAB>wnid<TAB>...)."""
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for line in (split_dir / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise UserError(f"{split_dir / 'val_annotations.txt'} labels {parts[0]} as {parts[1]!r}, "
                            f"which is not a class folder of {split_dir.parent / 'train'}")
        paths.append(str(split_dir / "images" / parts[0]))
        labels.append(index[parts[1]])
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return _Split([paths[i] for i in order], [labels[i] for i in order])


def _scan_image_folder(root: Path) -> tuple[_Split, _Split, list[str], str]:
    """(train, eval, classes, eval folder name) of an image folder, or a UserError naming the layout."""
    layout = "train/<class>/* and test/<class>/* (or val/<class>/*)"
    if root.exists() and not root.is_dir():
        raise UserError(f"data directory {root} is a file, not a directory; pass --data-dir PATH to a folder "
                        f"with {layout}")
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist; pass --data-dir PATH to a folder with {layout}")
    train_dir = root / "train"
    if not train_dir.is_dir() or not _class_dirs(train_dir):
        raise UserError(f"{root} has no train/<class>/ folders; --data-dir must point at a folder with {layout}")
    classes = _class_dirs(train_dir)
    train = _scan_class_split(train_dir, classes)
    if not train.paths:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")
    for split in _EVAL_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        if (split_dir / "val_annotations.txt").is_file():
            evaluation = _scan_annotated_split(split_dir, classes)
        elif set(_class_dirs(split_dir)) & set(classes):
            evaluation = _scan_class_split(split_dir, classes)
        else:
            # No folder named like a training class: unlabelled, e.g. Tiny-ImageNet's test/images.
            log.info("skipping %s: its folders are not training classes, so it has no labels", split_dir)
            continue
        if evaluation.paths:
            present = set(train.labels)
            empty = [c for i, c in enumerate(classes) if i not in present]
            if empty:
                log.warning("%d class folders under %s hold no images (e.g. %s)", len(empty), train_dir, empty[0])
            return train, evaluation, classes, split
    raise UserError(f"{root} has no labelled evaluation split; --data-dir must point at a folder with {layout}")


def _cache_key(root: Path, image_size: int | None, train: _Split, evaluation: _Split) -> str:
    h = hashlib.sha256()
    summary: dict[str, Any] = {"format": CACHE_FORMAT, "root": str(root.resolve()), "kind": "imagefolder",
                               "image_size": image_size}
    base = os.path.join(str(root), "")  # every scanned path starts with it
    for tag, split in (("train", train), ("eval", evaluation)):
        count, total, newest = 0, 0, 0
        names = hashlib.sha256()
        for p, label in zip(split.paths, split.labels):
            try:
                st = os.stat(p)
            except OSError as exc:
                raise UserError(f"cannot read {p} ({exc}); fix the file or the folder permissions") from exc
            count += 1
            total += st.st_size
            newest = max(newest, st.st_mtime_ns)
            # Relative path and label: a file moved between classes changes the key.
            names.update(f"{p.removeprefix(base)}\0{label}\n".encode())
        summary[tag] = [count, total, newest, names.hexdigest()]
    h.update(json.dumps(summary, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _load_image_folder(root: Path, cache_root: Path, image_size: int | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    root = root.expanduser()
    t0 = time.perf_counter()
    train, evaluation, classes, eval_name = _scan_image_folder(root)
    key = _cache_key(root, image_size, train, evaluation)
    path = cache_root / "datasets" / f"{key}.pt"
    log.info("image folder %s: %d train, %d %s images, %d classes (scanned in %.1fs); cache %s", root,
             len(train.paths), len(evaluation.paths), eval_name, len(classes), time.perf_counter() - t0, path)

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


# ---------------------------------------------------------------------------------------------
# Cache file.

_TENSOR_FIELDS = ("train_x", "train_y", "test_x", "test_y")


def _checksums(blob: dict[str, Any]) -> list[int]:
    # crc32 of the raw bytes: catches truncation and flipped bits that still unpickle (~0.1 s per 200 MB).
    return [zlib.crc32(blob[f].contiguous().numpy().view(np.uint8).reshape(-1).data) for f in _TENSOR_FIELDS]


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached blob, or None when it is missing, unreadable or inconsistent (it is then rebuilt)."""
    if not path.is_file():
        return None
    t0 = time.perf_counter()
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, I/O error: all mean "rebuild"
        log.warning("dataset cache %s is unreadable (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None
    problem = _cache_problem(blob, key)
    if problem:
        log.warning("dataset cache %s is invalid (%s); rebuilding it", path, problem)
        return None
    log.info("loaded dataset cache %s in %.1fs", path, time.perf_counter() - t0)
    return blob


def _cache_problem(blob: Any, key: str) -> str | None:
    if not isinstance(blob, dict):
        return f"holds a {type(blob).__name__}, not a dict"
    if blob.get("format") != CACHE_FORMAT or blob.get("key") != key:
        return "format or key mismatch"
    for f in _TENSOR_FIELDS:
        if not isinstance(blob.get(f), torch.Tensor):
            return f"{f} missing"
    tx, ty, ex, ey = (blob[f] for f in _TENSOR_FIELDS)
    if tx.dtype != torch.uint8 or ex.dtype != torch.uint8 or tx.dim() != 4 or ex.dim() != 4:
        return "images are not uint8 (N, C, H, W)"
    if ty.dtype != torch.int64 or ey.dtype != torch.int64 or len(tx) != len(ty) or len(ex) != len(ey):
        return "labels do not match images"
    classes = blob.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "class names missing"
    for y in (ty, ey):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            return "labels out of range"
    if blob.get("crc32") != _checksums(blob):
        return "checksum mismatch"
    return None


def _write_cache(path: Path, blob: dict[str, Any]) -> None:
    """Write atomically: readers never see half a file. A cache that cannot be written is a
    warning, not an error: the run goes on with the decoded data."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(blob, f), sync_dir=True)  # (0644: a shared cache)
        log.info("wrote dataset cache %s (%.0f MB)", path, path.stat().st_size / 1e6)
    except OSError as exc:
        log.warning("could not write dataset cache %s (%s); set $HVD_ABS_CACHE or the cache dir to a writable "
                    "folder to skip decoding next time", path, exc)


# ---------------------------------------------------------------------------------------------
# Decoding.


def decode_workers() -> int:
    """Threads used to decode images: $HVD_ABS_DECODE_WORKERS, else the CPUs this process may use."""
    env = os.environ.get("HVD_ABS_DECODE_WORKERS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise UserError(f"HVD_ABS_DECODE_WORKERS must be an integer, got {env!r}") from None
        return max(1, n)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Each thread gets at least this many files; fewer are decoded inline.
_FILES_PER_WORKER = 512


def _decode_files(paths: list[str], image_size: int | None) -> torch.Tensor:
    """Decode image files to a uint8 tensor (N, 3, H, W) on a thread pool, logging progress.

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, which is where large
    images spend their time, and threads cost nothing to start. A process pool measured slower here
    (each forkserver child imports torch, about 2.5 s), and forking a Horovod process is unsafe on
    fabrics like InfiniBand (Horovod's own examples avoid fork for that reason).
    """
    if not paths:
        raise UserError("no images to decode")
    if image_size is not None:
        h = w = image_size
    else:
        from PIL import Image, UnidentifiedImageError

        try:  # guarded like _decode_chunk: the first file may be as bad as any other
            with Image.open(paths[0]) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot decode image {paths[0]} ({exc}); remove or replace the file") from None
    n = len(paths)
    out = torch.empty((n, h, w, 3), dtype=torch.uint8)  # (N, H, W, C) as PIL gives it
    workers = min(decode_workers(), max(1, n // _FILES_PER_WORKER))
    chunk = max(16, min(1024, math.ceil(n / (workers * 8))))
    starts = range(0, n, chunk)
    jobs = [(paths[i:i + chunk], h, w, image_size) for i in starts]

    t0 = time.perf_counter()
    last_log = t0
    done = 0
    results: Iterator[np.ndarray]
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(workers, thread_name_prefix="hvd_abs-decode")
        results = pool.map(_decode_chunk, jobs)
    else:
        pool = None
        results = map(_decode_chunk, jobs)
    try:
        for start, arr in zip(starts, results):
            out[start:start + len(arr)] = torch.from_numpy(arr)
            done += len(arr)
            now = time.perf_counter()
            if now - last_log >= 5.0 or done == n:
                last_log = now
                log.info("decoding images: %d/%d (%.0f/s, %d threads)", done, n, done / max(now - t0, 1e-9), workers)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return out.permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def _decode_chunk(job: tuple[list[str], int, int, int | None]) -> np.ndarray:
    """Decode files to (n, h, w, 3) uint8, RGB."""
    from PIL import Image, UnidentifiedImageError

    paths, h, w, image_size = job
    arr = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                if image_size is not None:
                    im.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, much faster
                    rgb = _resize_center_crop(im.convert("RGB"), image_size)
                elif im.mode == "RGB":
                    im.load()
                    rgb = im
                else:
                    rgb = im.convert("RGB")  # grey, palette, CMYK, alpha
                if rgb.size != (w, h):
                    raise UserError(f"image {p} is {rgb.size[0]}x{rgb.size[1]} but others are {w}x{h}; pass an "
                                    f"image size to resize all images")
                arr[i] = np.asarray(rgb)
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot decode image {p} ({exc}); remove or replace the file") from None
    return arr


def _resize_center_crop(im: Any, size: int) -> Any:
    """Resize the shorter side to size (antialiased bilinear), then crop the centre size x size."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))
