"""The decoded-data cache file: its location, its key, reading and verifying it, writing it atomically."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hvd_abs.atomic import write_atomic
from hvd_abs.data.image_folder import _Split
from hvd_abs.errors import UserError

# The package's one logger name, as before the split (log formats show %(name)s).
log = logging.getLogger("hvd_abs.data")

# Bump when the cache file's contents or the decoding change: old files then miss the key.
CACHE_FORMAT = 1

_TENSOR_FIELDS = ("train_x", "train_y", "test_x", "test_y")


def default_cache_dir() -> Path:
    """The user cache root: $HVD_ABS_CACHE, else ~/.cache/hvd_abs."""
    env = os.environ.get("HVD_ABS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hvd_abs"


def _cache_key(root: Path, image_size: int | None, train: _Split, evaluation: _Split) -> str:
    h = hashlib.sha256()
    summary: dict[str, Any] = {"format": CACHE_FORMAT, "root": str(root.resolve()), "kind": "imagefolder",
                               "image_size": image_size}
    if image_size is not None:  # (a resized cache holds its kernel's pixels: keyed by it)
        summary["resize"] = "torch-antialias-bilinear"
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
