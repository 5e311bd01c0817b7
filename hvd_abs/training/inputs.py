"""The trainer's samples as float32 batches on its device, from held tensors (indexed) or streamed
(image files or a user's Dataset: hvd_abs.data.streaming, read ahead by hvd_abs.data.loader)."""
from __future__ import annotations

from typing import Any

import torch

from hvd_abs.augment import DECODE_AUGMENTS
from hvd_abs.data.loader import StreamLoader
from hvd_abs.data.streaming import ImageFiles, Streamed, take, to_unit


# Loaders whose processes a warm standby started (hvd_abs/launch/standby.py) before its run began.
_WARM: list[StreamLoader] = []


def train_recipe(augment: str) -> str:
    """How a streamed training sample is decoded under --augment `augment`."""
    return augment if augment in DECODE_AUGMENTS else "center"


def warm_loader(data: Any, augment: str, workers: int, pin_memory: bool, seed: int) -> None:
    """Start the loader processes a run on `data` with these options will use (when streamed)."""
    if isinstance(data.train_x, ImageFiles) and workers > 0:
        loader = StreamLoader(data.train_x, train_recipe(augment), workers, pin_memory=pin_memory, seed=int(seed))
        loader.start()
        _WARM.append(loader)


def _claim_warm(files: Any, recipe: str, workers: int, pin_memory: bool, seed: int) -> StreamLoader | None:
    """The warm loader made for these files and options, if any; the others are shut down."""
    found = next((w for w in _WARM if (w.recipe, w.workers, w.pin_memory, w.seed) == (recipe, workers, pin_memory,
                                                                                      seed)
                  and isinstance(files, ImageFiles) and files.same(w.files)), None)
    _WARM.clear()  # (dropping a loader's iterator stops its processes)
    return found


class Inputs:
    """Training micro-batches (in the sampler's order), the growth check's samples and the test split."""

    def __init__(self, data: Any, cfg: Any, device: torch.device, seed: int) -> None:
        self.data, self.device = data, device
        self.streamed = isinstance(data.train_x, Streamed)
        self.image_files = isinstance(data.train_x, ImageFiles)  # (decode-time crops need the files)
        decoded = cfg.augment in DECODE_AUGMENTS
        self.train_recipe = train_recipe(cfg.augment)
        # ImageNet's evaluation crop goes with its training crop; else as the memory cache decodes.
        self.eval_recipe = "eval" if decoded else "center"
        self.loader: StreamLoader | None = None
        self.warm = False  # (whether a standby had started this loader's processes)
        if self.streamed:
            pin = device.type == "cuda"
            self.loader = _claim_warm(data.train_x, self.train_recipe, cfg.loader_workers, pin, int(seed))
            self.warm = self.loader is not None
            if self.loader is None:
                self.loader = StreamLoader(data.train_x, self.train_recipe, cfg.loader_workers, pin_memory=pin,
                                           seed=int(seed))

    def train(self, micro: torch.Tensor, epoch: int, upcoming: Any) -> torch.Tensor:
        """Micro-batch `micro` (indices) of `epoch`; `upcoming()` iterates this rank's micro-batches
        from this update's first on (the streamed path decodes them ahead)."""
        if self.loader is None:
            return take(self.data.train_x, micro, self.device)
        return to_unit(self.loader.get(micro, epoch, upcoming), self.device)

    def samples(self, indices: torch.Tensor) -> torch.Tensor:
        """Training samples as evaluated: no augmentation (the growth check's)."""
        return take(self.data.train_x, indices, self.device, recipe=self.eval_recipe)

    def test(self, indices: torch.Tensor, test_x: Any = None) -> torch.Tensor:
        """Test samples `indices` (of `test_x`, default the run's test split)."""
        return take(self.data.test_x if test_x is None else test_x, indices, self.device, recipe=self.eval_recipe)

