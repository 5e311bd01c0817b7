"""Which samples each worker trains on: a pure function of (seed, epoch, position, global batch,
world size, rank), so a resize in the middle of an epoch neither loses nor repeats a sample.

- Every epoch has its own permutation of the training set, from (seed, epoch) only.
- The cursor `position` says how many samples of that permutation were consumed. The global batch
  at position p is perm[p : p + G]; a global batch that would run past the end is skipped (the
  short last batch, as the reference) and the epoch ends.
- The global batch is cut into micro-batches and dealt to (rank, accumulation step) by
  `hvd_abs.batching.layout` (micro-batch j -> rank j % A, step j // A).

`EpochSampler.state_dict()` is just (seed, num_samples, epoch, position): after a resize every rank
recomputes its share from it, so nothing depends on the old world size.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from hvd_abs.batching.layout import Layout, layout


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The permutation (num_samples,) int64 of epoch `epoch`, the same on every rank and run."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(num_samples, generator=gen)


def global_batch_indices(perm: torch.Tensor, position: int, global_batch: int) -> torch.Tensor | None:
    """perm[position : position + G], or None when fewer than G samples are left (short batch skipped)."""
    if position + global_batch > perm.numel():
        return None
    return perm[position:position + global_batch]


def rank_micro_batches(indices: torch.Tensor, lay: Layout, rank: int) -> list[torch.Tensor]:
    """The micro-batches (index tensors) `rank` runs for this global batch, one per accumulation step."""
    bounds = lay.micro_bounds()
    return [indices[bounds[j][0]:bounds[j][1]] for j in lay.micro_ids_for(rank)]


class EpochSampler:
    """Cursor over per-epoch permutations (see the module docstring)."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._perm: tuple[int, torch.Tensor] | None = None  # cache: (epoch, permutation)

    def permutation(self) -> torch.Tensor:
        """This epoch's permutation (cached)."""
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, epoch_permutation(self.seed, self.epoch, self.num_samples))
        return self._perm[1]

    def steps_left(self, global_batch: int) -> int:
        """Full global batches left in this epoch."""
        return (self.num_samples - self.position) // global_batch

    def next_indices(self, global_batch: int) -> torch.Tensor | None:
        """Indices (G,) of the next global batch, or None at the epoch's end. Does not advance."""
        return global_batch_indices(self.permutation(), self.position, global_batch)

    def shard(self, global_batch: int, base_batch: int, world_size: int, rank: int) -> list[torch.Tensor]:
        """This rank's micro-batches of the next global batch (empty list at the epoch's end or idle)."""
        idx = self.next_indices(global_batch)
        if idx is None:
            return []
        return rank_micro_batches(idx, layout(global_batch, base_batch, world_size), rank)

    def upcoming(self, global_batch: int, base_batch: int, world_size: int, rank: int) -> Iterator[torch.Tensor]:
        """This rank's micro-batches from the cursor to the epoch's end, lazily (what a streaming
        loader decodes ahead). Does not advance."""
        perm, position = self.permutation(), self.position
        lay = layout(global_batch, base_batch, world_size)
        while (idx := global_batch_indices(perm, position, global_batch)) is not None:
            yield from rank_micro_batches(idx, lay, rank)
            position += global_batch

    def advance(self, global_batch: int) -> None:
        """Mark the next global batch consumed (call after the update is applied)."""
        self.position += global_batch

    def new_epoch(self) -> None:
        """Move to the next epoch's permutation, at position 0."""
        self.epoch += 1
        self.position = 0

    @property
    def epoch_fraction(self) -> float:
        """Share of the epoch consumed, in [0, 1]."""
        return self.position / self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """(seed, num_samples, epoch, position)."""
        return {"seed": self.seed, "num_samples": self.num_samples, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output."""
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"sampler state is for {state['num_samples']} samples, this data has "
                             f"{self.num_samples}: resume with the same dataset")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._perm = None
