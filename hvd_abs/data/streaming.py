"""Image files read when their samples are asked for: data sets too large to decode into memory.

`ImageFiles` stands where an in-memory split holds its image tensor: it keeps only paths (and the
labels stay a tensor), and `load(indices, epoch)` decodes those samples. Every random choice of
an augmentation is drawn from (seed, epoch, sample index), never from a loader process's RNG, so
a sample decodes the same on any number of workers, after a resize and after a resume.

Recipes (what `decode` does to one file):
  center       resize the shorter side to S and crop the centre S x S: the in-memory cache's decode,
               so a streamed run equals an in-memory one pixel for pixel
  eval         ImageNet evaluation: shorter side to S / 0.875 (256 for 224), centre S x S crop
  rrc-flip     ImageNet training: random-resized crop (scale 0.08-1, aspect 3/4-4/3, as
               torchvision's RandomResizedCrop) to S x S, mirrored with probability 1/2

Decoding is Pillow's: its JPEG draft mode decodes at a reduced DCT scale when the output is
smaller than the file (2-4x faster on ImageNet-sized JPEGs), which torchvision.io's decoders lack.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from hvd_abs.data.decode import _resize_center_crop, decode_workers
from hvd_abs.errors import UserError

_EVAL_CROP = 0.875  # ImageNet's 224 of 256


class ImageFiles:
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
        """The files at `indices`, in that order (a subset, still not decoded)."""
        return ImageFiles(self.paths[indices.numpy()], self.size)

    def path(self, i: int) -> str:
        return self.paths[int(i)].decode()

    def decode(self, i: int, epoch: int = 0, recipe: str = "center", seed: int = 0) -> np.ndarray:
        """Sample i as (H, W, 3) uint8 (rrc-flip: its crop drawn from seed, epoch, i). Raises
        UserError naming a file that cannot be decoded."""
        from PIL import Image, UnidentifiedImageError

        p = self.path(i)
        h, w = self.size
        try:
            with Image.open(p) as im:
                if recipe == "rrc-flip":
                    rgb = _random_resized_crop(im, (h, w), np.random.default_rng([int(seed), int(epoch), int(i)]))
                elif recipe == "eval":
                    im.draft("RGB", (round(w / _EVAL_CROP), round(h / _EVAL_CROP)))
                    big = _resize_center_crop(im.convert("RGB"), round(min(h, w) / _EVAL_CROP))
                    left, top = (big.size[0] - w) // 2, (big.size[1] - h) // 2
                    rgb = big.crop((left, top, left + w, top + h))
                else:
                    im.draft("RGB", (w, h))
                    rgb = _resize_center_crop(im.convert("RGB"), h) if h == w else im.convert("RGB").resize((w, h))
                out = np.array(rgb)  # (writable: torch.from_numpy wants it)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"cannot decode image {p} ({exc}); remove or replace the file") from None
        if out.shape != (h, w, 3):
            raise UserError(f"image {p} decoded to {out.shape[1]}x{out.shape[0]}, not {w}x{h}")
        return out

    def load(self, indices: torch.Tensor, epoch: int = 0, recipe: str = "center", seed: int = 0) -> torch.Tensor:
        """Samples `indices` as uint8 (m, 3, S, S), decoded on a thread pool (Pillow frees the GIL)."""
        idx = [int(i) for i in indices]
        out = torch.empty((len(idx), *self.size, 3), dtype=torch.uint8)
        work = lambda k: out[k].copy_(torch.from_numpy(self.decode(idx[k], epoch, recipe, seed)))  # noqa: E731
        threads = min(decode_workers(), max(1, len(idx) // 8))
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads, thread_name_prefix="hvd_abs-decode") as pool:
                list(pool.map(work, range(len(idx))))
        else:
            for k in range(len(idx)):
                work(k)
        return out.permute(0, 3, 1, 2).contiguous()


def _random_resized_crop(im: Any, size: tuple[int, int], rng: np.random.Generator,
                         scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Any:
    """torchvision's RandomResizedCrop (the same search: 10 tries, then the centre at a clamped
    aspect) and a flip with probability 1/2, drawn from `rng`; the crop is decoded at the
    coarsest JPEG scale that still gives S pixels across it."""
    from PIL import Image

    W, H = im.size
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
    flip = bool(rng.integers(0, 2))
    h, w = size
    im.draft("RGB", (max(1, math.ceil(W * w / cw)), max(1, math.ceil(H * h / ch))))
    sx, sy = im.size[0] / W, im.size[1] / H  # the draft's reduction
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    out = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR, box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def take(x: Any, indices: torch.Tensor, device: torch.device | None = None, *, epoch: int = 0,
         recipe: str = "center") -> torch.Tensor:
    """Samples `indices` of a split's images (a tensor or ImageFiles) as float32 in [0, 1] on
    `device`. uint8 travels as uint8 (a quarter of the bytes) and is scaled there."""
    return to_unit(x.load(indices, epoch, recipe) if isinstance(x, ImageFiles) else x[indices], device)


def to_unit(batch: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A batch moved to `device` (uint8 as uint8: a quarter of the bytes), then as float32 in [0, 1]."""
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    return batch.to(torch.float32).div_(255.0) if batch.dtype == torch.uint8 else batch


def sample_stats(files: ImageFiles, limit: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a fixed random `limit` of the files (all when fewer), centre-cropped."""
    from hvd_abs.data.splits import channel_stats

    n = len(files)
    idx = torch.arange(n) if n <= limit else torch.randperm(n, generator=torch.Generator().manual_seed(54_321))[:limit]
    idx = idx.sort().values
    if len(idx) <= _STATS_CHUNK:  # (one pass, as the memory path measures: a small set gets its very numbers)
        return channel_stats(files.load(idx).to(torch.float32).div_(255.0))
    # In chunks, so the float copy stays small (2048 ImageNet crops would be 1.2 GB at once).
    total, sums, squares = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(idx), _STATS_CHUNK):
        x = files.load(idx[i:i + _STATS_CHUNK]).to(torch.float64).div_(255.0)
        total += x.numel() // 3
        sums += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    mean = sums / total
    std = (squares / total - mean.square()).clamp_min(0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


_STATS_CHUNK = 256
