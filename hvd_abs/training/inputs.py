"""The trainer's samples as float32 [0, 1] batches on its device, from held tensors (indexed) or
from image files (streamed: hvd_abs.data.streaming, decoded ahead by hvd_abs.data.loader)."""
from __future__ import annotations

from typing import Any

import torch

from hvd_abs.augment import DECODE_AUGMENTS
from hvd_abs.data.loader import StreamLoader
from hvd_abs.data.streaming import ImageFiles, take, to_unit


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
            self.loader = StreamLoader(data.train_x, self.train_recipe, cfg.loader_workers,
                                       pin_memory=device.type == "cuda", seed=int(seed))

    def train(self, micro: torch.Tensor, epoch: int, upcoming: Any) -> torch.Tensor:
        """Micro-batch `micro` (indices) of `epoch`; `upcoming()` iterates this rank's micro-batches
        from this update's first on (the streamed path decodes them ahead)."""
        if self.loader is None:
            return take(self.data.train_x, micro, self.device)
        return to_unit(self.loader.get(micro, epoch, upcoming), self.device)

    def samples(self, indices: torch.Tensor) -> torch.Tensor:
        """Training samples as evaluated: no augmentation (the growth check's)."""
        return take(self.data.train_x, indices, self.device, recipe=self.eval_recipe)

    def test(self, indices: torch.Tensor) -> torch.Tensor:
        return take(self.data.test_x, indices, self.device, recipe=self.eval_recipe)

