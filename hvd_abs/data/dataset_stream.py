"""A user's map-style torch Dataset read sample by sample (hvd_abs.splits_from_datasets(loading=
"stream")): each worker reads only its own micro-batches, in the loader's background processes.

The trainer indexes samples by position, so the Dataset needs len() and dataset[i] -> (input
tensor, class index). Its transforms may be random: each call runs with torch's, numpy's and
Python's global RNGs seeded from (seed, epoch, i), and restored after, so a sample reads the
same on any number of workers, after a resize and after a resume, and the trainer's own random
stream (dropout, FGSM, the Hessian's vectors) is not disturbed. (The test split and the growth
check's samples are read at seed 0, epoch 0: the same inputs every epoch.)
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch

from hvd_abs.data.streaming import Streamed
from hvd_abs.errors import UserError


class DatasetSamples(Streamed):
    """The inputs of `dataset` at positions `index`; `labels` are theirs (for the check that a
    sample's label is the one the trainer indexed)."""

    def __init__(self, dataset: Any, split: str, labels: torch.Tensor, sample_shape: tuple[int, ...],
                 dtype: torch.dtype, index: np.ndarray | None = None) -> None:
        self.dataset, self.split, self.labels = dataset, split, labels
        self.sample_shape, self.dtype = tuple(sample_shape), dtype
        self.index = np.arange(len(labels)) if index is None else index

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.sample_shape)

    def select(self, indices: torch.Tensor) -> "DatasetSamples":
        return DatasetSamples(self.dataset, self.split, self.labels[indices], self.sample_shape, self.dtype,
                              self.index[indices.numpy()])

    def sample(self, i: int, epoch: int = 0, recipe: str = "center", seed: int = 0) -> torch.Tensor:
        j = int(self.index[int(i)])
        with seeded(seed, epoch, i):
            item = self.dataset[j]
        x, y = _pair(self.split, item, j)
        if x.shape != self.sample_shape or x.dtype != self.dtype:
            raise UserError(f"sample {j} of the {self.split} data set is {x.dtype} {tuple(x.shape)}, but sample 0 is "
                            f"{self.dtype} {self.sample_shape}: make every input one shape and dtype")
        if y != int(self.labels[int(i)]):
            raise UserError(f"sample {j} of the {self.split} data set has label {y}, but its targets say "
                            f"{int(self.labels[int(i)])}: make dataset[i] return targets[i]")
        return x


@contextlib.contextmanager
def seeded(seed: int, epoch: int, i: int) -> Iterator[None]:
    """torch's CPU, numpy's and Python's global RNGs seeded from (seed, epoch, i) inside, as before after."""
    a, b = (int(v) for v in np.random.SeedSequence([int(seed) % 2**64, int(epoch), int(i)]).generate_state(2))
    saved = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    torch.random.default_generator.manual_seed(a << 32 | b)  # (only the CPU's: CUDA's stream stays the trainer's)
    np.random.seed(a)
    random.seed(b)
    try:
        yield
    finally:
        torch.random.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


def _pair(split: str, item: Any, j: int) -> tuple[torch.Tensor, int]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UserError(f"the {split} data set's samples are not (input, label) pairs: return two items")
    x, y = item
    if not isinstance(x, torch.Tensor):
        raise UserError(f"the {split} data set's inputs are not tensors ({type(x).__name__}): make them tensors "
                        f"(torchvision: transforms.ToTensor())")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise UserError(f"the {split} data set's inputs are {x.dtype}: give float32 in [0, 1] or uint8 images")
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.dtype.is_floating_point:
        y = y.item()
    if isinstance(y, (bool, float)) or not isinstance(y, (int, np.integer)):
        raise UserError(f"the {split} data set's labels are not integer class indices (sample {j}: {y!r}): map "
                        f"them to 0..K-1 (torchvision: target_transform, or dataset.class_to_idx)")
    return x.float() if x.dtype.is_floating_point and x.dtype != torch.float32 else x, int(y)


def targets_of(split: str, ds: Any) -> torch.Tensor:
    """The labels of every sample of `ds`, from its `.targets` (torchvision's data sets, also under
    a Subset) when it has them, else read sample by sample once (slow: every input is read too)."""
    n = len(ds)
    base, picks = ds, None
    while hasattr(base, "indices") and hasattr(base, "dataset"):  # torch Subsets, nested
        picks = np.asarray(base.indices) if picks is None else np.asarray(base.indices)[picks]
        base = base.dataset
    targets = getattr(base, "targets", None)
    if targets is not None:
        try:
            t = torch.as_tensor(np.asarray(targets))
            t = t if picks is None else t[torch.as_tensor(picks)]
        except (TypeError, ValueError, IndexError):
            t = None
        if t is not None and t.dim() == 1 and len(t) == n and not t.dtype.is_floating_point:
            return t.long()
    from hvd_abs.data.splits import log

    log.warning("the %s data set has no .targets: reading all %d samples once for their labels", split, n)
    labels = []
    for j in range(n):
        with seeded(0, 0, j):  # (its transforms must not draw from the trainer's streams)
            labels.append(_pair(split, ds[j], j)[1])
    return torch.tensor(labels, dtype=torch.int64)


def input_bytes(ds: Any) -> int:
    """The bytes of sample 0's input (0 when it is not a tensor: the memory path refuses it)."""
    with seeded(0, 0, 0):
        item = ds[0]
    x = item[0] if isinstance(item, (tuple, list)) and item else None
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def first_sample(split: str, ds: Any) -> torch.Tensor:
    """Sample 0's input, as the stream reads it (its shape and dtype stand for all)."""
    with seeded(0, 0, 0):
        return _pair(split, ds[0], 0)[0]


def stream_splits(train: Any, test: Any, *, name: str, num_classes: int | None, classes: tuple[str, ...]) -> Any:
    """Splits whose inputs are read from the data sets when the trainer asks for them."""
    from hvd_abs.data.splits import Splits, class_count, log
    from hvd_abs.data.streaming import sample_stats

    parts = []
    for split, ds in (("train", train), ("test", test)):
        x0 = first_sample(split, ds)
        parts.append(DatasetSamples(ds, split, targets_of(split, ds), tuple(x0.shape), x0.dtype))
    tr, te = parts
    if tr.sample_shape != te.sample_shape:
        raise UserError(f"train samples have shape {tr.sample_shape} but test samples {te.sample_shape}: give both "
                        f"splits the same sample shape")
    k = class_count((tr.labels, te.labels), num_classes, classes)
    mean, std = sample_stats(tr)
    log.info("dataset %s: %d train, %d test, %d classes, samples %s, streamed", name, len(tr), len(te), k,
             "x".join(map(str, tr.sample_shape)))
    return Splits(train_x=tr, train_y=tr.labels, test_x=te, test_y=te.labels, num_classes=k,
                  in_shape=tr.sample_shape, mean=mean, std=std, name=name, classes=tuple(str(c) for c in classes))
