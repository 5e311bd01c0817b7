"""The trainer's samples as float32 [0, 1] batches on its device, from held tensors (indexed) or
from image files (streamed: hvd_abs.data.streaming, decoded ahead by hvd_abs.data.loader)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from hvd_abs.augment import DECODE_AUGMENTS
from hvd_abs.batching.layout import layout
from hvd_abs.data.loader import StreamLoader
from hvd_abs.data.streaming import ImageFiles, take
from hvd_abs.sampling import rank_micro_batches


class Inputs:
    """Training micro-batches (in the sampler's order), the growth check's samples and the test split."""

    def __init__(self, data: Any, cfg: Any, device: torch.device, seed: int) -> None:
        self.data, self.device = data, device
        self.streamed = isinstance(data.train_x, ImageFiles)
        decoded = cfg.augment in DECODE_AUGMENTS
        self.train_recipe = cfg.augment if decoded else "center"
        # ImageNet's evaluation crop goes with its training crop; else as the memory cache decodes.
        self.eval_recipe = "eval" if decoded else "center"
        self.loader: StreamLoader | None = None
        if self.streamed:
            data.train_x.seed = data.test_x.seed = int(seed)
            self.loader = StreamLoader(data.train_x, self.train_recipe, cfg.loader_workers,
                                       pin_memory=device.type == "cuda")

    def train(self, micro: torch.Tensor, epoch: int, upcoming: Any) -> torch.Tensor:
        """Micro-batch `micro` (indices) of `epoch`; `upcoming()` iterates this rank's micro-batches
        from this update's first on (the streamed path decodes them ahead)."""
        if self.loader is None:
            return take(self.data.train_x, micro, self.device)
        x = self.loader.get(micro, epoch, upcoming).to(self.device, non_blocking=True)
        return x.to(torch.float32).div_(255.0)

    def samples(self, indices: torch.Tensor) -> torch.Tensor:
        """Training samples as evaluated: no augmentation (the growth check's)."""
        return take(self.data.train_x, indices, self.device, recipe=self.eval_recipe)

    def test(self, indices: torch.Tensor) -> torch.Tensor:
        return take(self.data.test_x, indices, self.device, recipe=self.eval_recipe)


def upcoming_micro_batches(sampler: Any, global_batch: int, base_batch: int, world: int, rank: int
                           ) -> Iterator[torch.Tensor]:
    """This rank's micro-batches from the sampler's cursor to the epoch's end, lazily."""
    perm, position, n = sampler.permutation(), sampler.position, sampler.num_samples
    lay = layout(global_batch, base_batch, world)
    while position + global_batch <= n:
        yield from rank_micro_batches(perm[position:position + global_batch], lay, rank)
        position += global_batch
