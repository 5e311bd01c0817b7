"""Decoding image files to a uint8 tensor on a thread pool, and how many threads to use."""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
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

    Threads, not processes: Pillow's decoder and torch's resize release the GIL, which is where
    large images spend their time, and threads cost nothing to start. A process pool measured
    slower here (each forkserver child imports torch, about 2.5 s), and forking a Horovod process
    is unsafe on fabrics like InfiniBand (Horovod's own examples avoid fork for that reason).
    """
    if not paths:
        raise UserError("no images to decode")
    h, w = (image_size, image_size) if image_size is not None else first_image_size(paths[0])
    n = len(paths)
    out = torch.empty((n, 3, h, w), dtype=torch.uint8)
    workers = min(decode_workers(), max(1, n // _FILES_PER_WORKER))
    chunk = max(16, min(1024, math.ceil(n / (workers * 8))))
    starts = range(0, n, chunk)
    jobs = [(paths[i:i + chunk], h, w, image_size) for i in starts]

    t0 = time.perf_counter()
    last_log = t0
    done = 0
    results: Iterator[torch.Tensor]
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(workers, thread_name_prefix="hvd_abs-decode")
        results = pool.map(_decode_chunk, jobs)
    else:
        pool = None
        results = map(_decode_chunk, jobs)
    threads = torch.get_num_threads()
    if pool is not None:
        torch.set_num_threads(1)  # the pool's threads each resize: torch's own threads would oversubscribe
    try:
        for start, arr in zip(starts, results):
            out[start:start + len(arr)] = arr
            done += len(arr)
            now = time.perf_counter()
            if now - last_log >= 5.0 or done == n:
                last_log = now
                log.info("decoding images: %d/%d (%.0f/s, %d threads)", done, n, done / max(now - t0, 1e-9), workers)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
    return out


def first_image_size(path: str) -> tuple[int, int]:
    """(H, W) of the image file at `path`, read from its header; UserError when it cannot be."""
    from PIL import Image, UnidentifiedImageError

    try:  # guarded like read_rgb: the first file may be as bad as any other
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot decode image {path} ({exc}); remove or replace the file") from None


def read_rgb(path: str, at_least: Callable[[int, int], tuple[int, int]] | None = None
             ) -> tuple[torch.Tensor, tuple[float, float]]:
    """The image file at `path` as (3, H, W) uint8 RGB, and the scale it was decoded at (sx, sy).

    at_least(W, H) -> (w, h): the size the decode may come down to. A JPEG at least twice that
    decodes at 1/2, 1/4 or 1/8 scale (Pillow's draft mode: the IDCT does the reduction, several
    times faster); other RGB JPEGs by torchvision.io, the same pixels as Pillow's decoder (both
    libjpeg-turbo) at about twice its speed here with the copies Pillow needs; the rest (grey,
    CMYK, PNG, ...) by Pillow. Raises UserError naming a file that cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size = im.size
            want = at_least(*size) if at_least is not None else None
            draft = want is not None and im.format == "JPEG" and size[0] >= 2 * want[0] and size[1] >= 2 * want[1]
            fast = None if draft or im.format != "JPEG" or im.mode != "RGB" else _jpeg_decoder()
            if fast is None:
                if draft:
                    im.draft("RGB", want)
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                arr = np.asarray(rgb).copy()  # (writable, for torch)
        if fast is not None:
            return fast(path), (1.0, 1.0)
    except (UnidentifiedImageError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot decode image {path} ({' '.join(str(exc).split())[:200]}); remove or replace the "
                        f"file") from None
    return torch.from_numpy(arr).permute(2, 0, 1), (arr.shape[1] / size[0], arr.shape[0] / size[1])


@functools.cache
def _jpeg_decoder() -> Callable[[str], torch.Tensor] | None:
    """torchvision.io's JPEG decoder, or None where this torchvision has none (they are deprecated
    for TorchCodec's since 0.29: Pillow then decodes, to the same pixels). Its ops are called
    directly: the Python wrappers warn of the deprecation on every call."""
    try:
        import torchvision.io as tio  # (registers torch.ops.image)

        ops, mode = torch.ops.image, tio.ImageReadMode.RGB.value
        ops.decode_jpeg, ops.read_file  # noqa: B018 (present in this build?)
        return lambda path: ops.decode_jpeg(ops.read_file(path), mode, False)
    except (ImportError, AttributeError, RuntimeError):
        return None


def resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A (3, H, W) uint8 image resized to (3, h, w): antialiased bilinear, torch's uint8 kernel
    (torchvision's resize; about twice Pillow's speed here, benchmarks/bench_decoders.py)."""
    if tuple(img.shape[1:]) == (h, w):
        return img
    return torch.nn.functional.interpolate(img.unsqueeze(0), size=(h, w), mode="bilinear", antialias=True,
                                           align_corners=False)[0]


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side of a (3, H, W) image to size, then crop the centre size x size."""
    h, w = img.shape[1:]
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = resize(img, nh, nw)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img[:, top:top + size, left:left + size]


def _decode_chunk(job: tuple[list[str], int, int, int | None]) -> torch.Tensor:
    """Decode files to (n, 3, h, w) uint8, RGB."""
    paths, h, w, image_size = job
    arr = torch.empty((len(paths), 3, h, w), dtype=torch.uint8)
    for i, p in enumerate(paths):
        if image_size is not None:
            img = resize_center_crop(read_rgb(p, lambda W, H: (image_size, image_size))[0], image_size)
        else:
            img = read_rgb(p)[0]
        if tuple(img.shape[1:]) != (h, w):
            raise UserError(f"image {p} is {img.shape[2]}x{img.shape[1]} but others are {w}x{h}; pass an "
                            f"image size to resize all images")
        arr[i] = img
    return arr
