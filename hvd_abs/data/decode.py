"""Decoding image files to a uint8 tensor on a thread pool, and how many threads to use."""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hvd_abs.errors import UserError

# The package's one logger name, as before the split (log formats show %(name)s).
log = logging.getLogger("hvd_abs.data")


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
    h, w = (image_size, image_size) if image_size is not None else first_image_size(paths[0])
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


def first_image_size(path: str) -> tuple[int, int]:
    """(H, W) of the image file at `path`, read from its header; UserError when it cannot be."""
    from PIL import Image, UnidentifiedImageError

    try:  # guarded like _decode_chunk: the first file may be as bad as any other
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot decode image {path} ({exc}); remove or replace the file") from None


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
