"""Inputs read when their samples are asked for: data sets too large to decode into memory.

A `Streamed` split stands where an in-memory split holds its input tensor (the labels stay a
tensor): `sample(i, epoch)` reads one sample, `load(indices, epoch)` several. `ImageFiles` keeps
only paths and decodes them; a user's own map-style Dataset is hvd_abs.data.dataset_stream's
`DatasetSamples`. Every random choice of an augmentation is drawn from (seed, epoch, sample
index), never from a loader process's RNG, so a sample decodes the same on any number of
workers, after a resize and after a resume.

Recipes (what `decode` does to one file):
  center       resize the shorter side to S and crop the centre S x S: the in-memory cache's decode,
               so a streamed run equals an in-memory one pixel for pixel
  eval         ImageNet evaluation: shorter side to S / 0.875 (256 for 224), centre S x S crop
  rrc-flip     ImageNet training: random-resized crop (scale 0.08-1, aspect 3/4-4/3, as
               torchvision's RandomResizedCrop) to S x S, mirrored with probability 1/2

Files are read by hvd_abs.data.decode.read_rgb (torchvision.io, or Pillow's draft mode for JPEGs
at least twice the output) and resized by torch's antialiased uint8 kernel.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from hvd_abs.data.decode import decode_workers, read_rgb, resize, resize_center_crop
from hvd_abs.errors import UserError

_EVAL_CROP = 0.875  # ImageNet's 224 of 256


class Streamed:
    """A split's inputs, read per sample: shape (N, *sample shape) like the tensor it stands for."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def select(self, indices: torch.Tensor) -> "Streamed":
        """The samples at `indices`, in that order (a subset, still not read)."""
        raise NotImplementedError

    def sample(self, i: int, epoch: int = 0, recipe: str = "center", seed: int = 0) -> torch.Tensor:
        """Sample i as a (C, ...) uint8 or float tensor, its random choices drawn from (seed, epoch, i)."""
        raise NotImplementedError

    def load(self, indices: torch.Tensor, epoch: int = 0, recipe: str = "center", seed: int = 0) -> torch.Tensor:
        """Samples `indices` stacked: (m, C, ...)."""
        return torch.stack([self.sample(int(i), epoch, recipe, seed) for i in indices])


class ImageFiles(Streamed):
    """The images of one split as files: shape (N, 3, S, S) like the tensor it stands for."""

    def __init__(self, paths: Sequence[str], size: tuple[int, int]) -> None:
        # A numpy array of bytes: a few dozen bytes a path, not a Python object each.
        self.paths = np.asarray([p.encode() for p in paths]) if not isinstance(paths, np.ndarray) else paths
        self.size = (int(size[0]), int(size[1]))  # (H, W)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, *self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, indices: torch.Tensor) -> "ImageFiles":
        return ImageFiles(self.paths[indices.numpy()], self.size)

    def same(self, other: Any) -> bool:
        """Whether `other` is the same files, in the same order, at the same size."""
        return (isinstance(other, ImageFiles) and self.size == other.size
                and (self.paths is other.paths or np.array_equal(self.paths, other.paths)))

    def path(self, i: int) -> str:
        return self.paths[int(i)].decode()

    def decode(self, i: int, epoch: int = 0, recipe: str = "center", seed: int = 0) -> torch.Tensor:
        """Sample i as (3, H, W) uint8 (rrc-flip: its crop drawn from seed, epoch, i). Raises
        UserError naming a file that cannot be decoded."""
        p = self.path(i)
        h, w = self.size
        if recipe == "rrc-flip":
            out = _random_resized_crop(p, (h, w), np.random.default_rng([int(seed) % 2**64, int(epoch), int(i)]))
        elif recipe == "eval":
            side = round(min(h, w) / _EVAL_CROP)
            big = resize_center_crop(read_rgb(p, lambda W, H: (round(w / _EVAL_CROP), round(h / _EVAL_CROP)))[0], side)
            top, left = (side - h) // 2, (side - w) // 2
            out = big[:, top:top + h, left:left + w]
        else:
            img = read_rgb(p, lambda W, H: (w, h))[0]
            out = resize_center_crop(img, h) if h == w else resize(img, h, w)
        if tuple(out.shape) != (3, h, w):
            raise UserError(f"image {p} decoded to {out.shape[2]}x{out.shape[1]}, not {w}x{h}")
        return out

    def sample(self, i: int, epoch: int = 0, recipe: str = "center", seed: int = 0) -> torch.Tensor:
        return self.decode(i, epoch, recipe, seed)

    def load(self, indices: torch.Tensor, epoch: int = 0, recipe: str = "center", seed: int = 0) -> torch.Tensor:
        """Samples `indices` as uint8 (m, 3, S, S), decoded on a thread pool (Pillow and torch free the GIL)."""
        idx = [int(i) for i in indices]
        out = torch.empty((len(idx), 3, *self.size), dtype=torch.uint8)
        work = lambda k: out[k].copy_(self.decode(idx[k], epoch, recipe, seed))  # noqa: E731
        threads = min(decode_workers(), max(1, len(idx) // 8))
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            saved = torch.get_num_threads()
            torch.set_num_threads(1)  # (each thread resizes: torch's own threads would oversubscribe)
            try:
                with ThreadPoolExecutor(threads, thread_name_prefix="hvd_abs-decode") as pool:
                    list(pool.map(work, range(len(idx))))
            finally:
                torch.set_num_threads(saved)
        else:
            for k in range(len(idx)):
                work(k)
        return out


def _random_resized_crop(path: str, size: tuple[int, int], rng: np.random.Generator,
                         scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
                         ) -> torch.Tensor:
    """torchvision's RandomResizedCrop (the same search: 10 tries, then the centre at a clamped
    aspect) and a flip with probability 1/2, drawn from `rng`; the file is decoded at the
    coarsest JPEG scale that still gives S pixels across the crop."""
    h, w = size
    box: list[int] = []

    def at_least(W: int, H: int) -> tuple[int, int]:
        area = W * H
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= W and 0 < ch <= H:
                top, left = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
                break
        else:
            in_ratio = W / H
            if in_ratio < ratio[0]:
                cw, ch = W, round(W / ratio[0])
            elif in_ratio > ratio[1]:
                ch, cw = H, round(H * ratio[1])
            else:
                cw, ch = W, H
            top, left = (H - ch) // 2, (W - cw) // 2
        box.extend((left, top, cw, ch))
        return max(1, math.ceil(W * w / cw)), max(1, math.ceil(H * h / ch))

    img, (sx, sy) = read_rgb(path, at_least)
    flip = bool(rng.integers(0, 2))
    left, top, cw, ch = box
    # The crop in the decoded image's pixels (the draft's reduction), at least 1 x 1.
    x0, y0 = min(img.shape[2] - 1, int(left * sx)), min(img.shape[1] - 1, int(top * sy))
    x1, y1 = max(x0 + 1, round((left + cw) * sx)), max(y0 + 1, round((top + ch) * sy))
    out = resize(img[:, y0:y1, x0:x1], h, w)
    return out.flip(-1) if flip else out


def take(x: Any, indices: torch.Tensor, device: torch.device | None = None, *, epoch: int = 0,
         recipe: str = "center") -> torch.Tensor:
    """Samples `indices` of a split's inputs (a tensor or Streamed) as float32 (uint8 scaled to
    [0, 1]) on `device`. uint8 travels as uint8 (a quarter of the bytes) and is scaled there."""
    return to_unit(x.load(indices, epoch, recipe) if isinstance(x, Streamed) else x[indices], device)


def to_unit(batch: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A batch moved to `device` (uint8 as uint8: a quarter of the bytes), then as float32 in [0, 1]."""
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    return batch.to(torch.float32).div_(255.0) if batch.dtype == torch.uint8 else batch


def sample_stats(files: Streamed, limit: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a fixed random `limit` of the samples (all when fewer; images
    centre-cropped)."""
    from hvd_abs.data.splits import channel_stats

    n = len(files)
    idx = torch.arange(n) if n <= limit else torch.randperm(n, generator=torch.Generator().manual_seed(54_321))[:limit]
    idx = idx.sort().values
    if len(idx) <= _STATS_CHUNK:  # (one pass, as the memory path measures: a small set gets its very numbers)
        return channel_stats(to_unit(files.load(idx)))
    # In chunks, so the float copy stays small (2048 ImageNet crops would be 1.2 GB at once).
    channels = files.shape[1]
    total, sums, squares = 0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    for i in range(0, len(idx), _STATS_CHUNK):
        x = to_unit(files.load(idx[i:i + _STATS_CHUNK])).to(torch.float64)
        dims = (0, *range(2, x.dim()))
        total += x.numel() // channels
        sums += x.sum(dim=dims)
        squares += x.square().sum(dim=dims)
    mean = sums / total
    std = (squares / total - mean.square()).clamp_min(0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


_STATS_CHUNK = 256
