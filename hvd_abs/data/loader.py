"""Background decoding of a rank's upcoming micro-batches (the streaming path's prefetch).

The trainer asks for its micro-batches one by one, in the order the sampler deals them. The
loader is handed the iterator of what this rank will ask for next (the rest of the epoch at the
current global batch and world size) and keeps torch DataLoader workers decoding ahead of it.
Each delivered batch carries its sample indices: when the trainer asks for another one (an epoch
ended, the batch grew, the world resized, a resume) the loader restarts from the new plan, so the
order stays the sampler's and no sample is lost or repeated. Workers persist across restarts.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from hvd_abs.data.streaming import Streamed
from hvd_abs.errors import UserError


class _Plan:
    """The batch sampler: iterated in the main process, so it can be swapped between iterations."""

    def __init__(self) -> None:
        self.batches: Iterator[list[tuple[int, int]]] = iter(())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.batches


class _Samples(Dataset):
    def __init__(self, files: Streamed, recipe: str, seed: int) -> None:
        self.files, self.recipe, self.seed = files, recipe, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any, str]:
        epoch, i = key
        try:
            return i, self.files.sample(i, epoch, self.recipe, self.seed), ""
        except UserError as exc:  # travels as a value: a worker's exception would arrive as a traceback
            return i, None, str(exc)


def _collate(items: list[tuple[int, Any, str]]) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    errors = [e for _, _, e in items if e]
    idx = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    if errors:
        return idx, None, errors[0]
    return idx, torch.stack([x for _, x, _ in items]), ""


class StreamLoader:
    """Micro-batches of `files` decoded by `workers` background processes (0: in this process)."""

    def __init__(self, files: Streamed, recipe: str, workers: int = 2, pin_memory: bool = False,
                 prefetch: int = 4, seed: int = 0) -> None:
        self._plan = _Plan()
        extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": prefetch} if workers > 0 else {}
        self._loader = DataLoader(_Samples(files, recipe, seed), batch_sampler=self._plan, num_workers=workers,
                                  collate_fn=_collate, pin_memory=pin_memory, **extra,
                                  # Its own generator: each iter() draws a seed, which must not come from
                                  # torch's global RNG (dropout, FGSM, the Hessian's vectors use that one).
                                  generator=torch.Generator())
        self.files, self.recipe, self.workers, self.pin_memory, self.seed = files, recipe, workers, pin_memory, seed
        self._it: Iterator[Any] | None = None
        self._epoch: int | None = None
        self.restarts = 0  # (how often a plan was abandoned: resizes, growths, epochs)

    def start(self) -> None:
        """Start the worker processes now, with nothing to decode yet (a warm standby's)."""
        self._plan.batches = iter(())
        self._it = iter(self._loader)

    def get(self, micro: torch.Tensor, epoch: int, upcoming: Callable[[], Iterator[torch.Tensor]]) -> torch.Tensor:
        """Micro-batch `micro` of `epoch` as (m, C, ...), uint8 for images. `upcoming()` iterates this rank's
        micro-batches from this update's first on; it is called only when the plan in flight went
        elsewhere."""
        if self._it is not None and self._epoch == epoch:
            got = next(self._it, None)
            if got is not None and torch.equal(got[0], micro):
                return self._checked(got)
        # (From this micro-batch on: a plan can go elsewhere within an update, when the old one
        # held the same first micro-batch.)
        self._start(epoch, itertools.dropwhile(lambda m: not torch.equal(m, micro), upcoming()))
        got = next(self._it, None)
        if got is None or not torch.equal(got[0], micro):
            raise RuntimeError("the loader's plan does not start with the micro-batch asked for")
        return self._checked(got)

    def _start(self, epoch: int, micros: Iterator[torch.Tensor]) -> None:
        self.restarts += self._epoch is not None
        self._plan.batches = ([(epoch, int(i)) for i in m] for m in micros)
        self._epoch = epoch
        self._it = iter(self._loader)  # (persistent workers drop what the last plan had in flight)

    @staticmethod
    def _checked(got: tuple[torch.Tensor, torch.Tensor | None, str]) -> torch.Tensor:
        if got[2]:
            raise UserError(got[2])
        assert got[1] is not None
        return got[1]
