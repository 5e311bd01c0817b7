"""How one global batch is laid out over workers, micro-batches and accumulation steps.

The math of a step depends only on the global batch G and the micro-batch (base) size b, never on
the world size W:

- G is cut into M = ceil(G / b) contiguous micro-batches whose sizes differ by at most one
  (G = 384, b = 128 -> 3 x 128; G = 64 -> 1 x 64; G = 192, b = 128 -> 2 x 96). BatchNorm sees
  these micro-batches, as the reference's 128-sample ghost batches.
- Each micro-batch's loss is a *sum* over its samples divided by G, so the accumulated and
  allreduced (summed) gradient is the mean gradient of the global batch whatever the split.
- Micro-batch j goes to accumulation step j // A on rank j % A, where A = min(W, M) is the number of
  *active* workers. When G < W * b there are fewer micro-batches than workers: the extra ranks stay
  idle for that update (they contribute zero gradient) instead of shrinking the micro-batch. That
  keeps BatchNorm statistics and the adversarial share identical at every world size, which is what
  lets an elastic resize change nothing but speed; the elastic launcher asks for
  `wanted_world_size` = min(max_np, M) workers, so idle ranks are only a transient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hvd_abs.errors import UserError


@dataclass(frozen=True)
class Layout:
    """The layout of one global batch (see the module docstring)."""

    global_batch: int
    base_batch: int
    world_size: int
    num_micro: int        # M = ceil(G / b)
    active_workers: int   # A = min(W, M)
    accum_steps: int      # K = ceil(M / A): the most micro-batches any rank runs per update
    per_worker_batch: int  # the largest micro-batch size, ceil(G / M)

    def micro_sizes(self) -> list[int]:
        """Sizes of the M micro-batches, in order (the first G % M are one larger)."""
        q, r = divmod(self.global_batch, self.num_micro)
        return [q + 1 if j < r else q for j in range(self.num_micro)]

    def micro_bounds(self) -> list[tuple[int, int]]:
        """(start, end) offsets of each micro-batch inside the global batch."""
        out, start = [], 0
        for size in self.micro_sizes():
            out.append((start, start + size))
            start += size
        return out

    def micro_ids_for(self, rank: int) -> list[int]:
        """Micro-batch indices run by `rank`, one per accumulation step (empty for an idle rank)."""
        return list(range(rank, self.num_micro, self.active_workers)) if rank < self.active_workers else []


def _check_positive(name: str, value: int, flag: str) -> None:
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}: pass {flag} N with N >= 1")


def layout(global_batch: int, base_batch: int, world_size: int) -> Layout:
    """The full `Layout` of a global batch on `world_size` workers with micro-batch `base_batch`."""
    _check_positive("the global batch", global_batch, "--batch")
    _check_positive("the base (micro-)batch", base_batch, "--base-batch")
    _check_positive("the world size", world_size, "-np")
    num_micro = math.ceil(global_batch / base_batch)
    active = min(world_size, num_micro)
    return Layout(global_batch=global_batch, base_batch=base_batch, world_size=world_size,
                  num_micro=num_micro, active_workers=active,
                  accum_steps=math.ceil(num_micro / active),
                  per_worker_batch=math.ceil(global_batch / num_micro))


def plan(global_batch: int, base_batch: int, world_size: int) -> tuple[int, int]:
    """(per_worker_batch, accum_steps) for a global batch; see `layout` for the rule."""
    lay = layout(global_batch, base_batch, world_size)
    return lay.per_worker_batch, lay.accum_steps


def wanted_world_size(global_batch: int, base_batch: int, max_np: int) -> int:
    """Workers worth having for this global batch: min(max_np, ceil(G / b)), at least 1."""
    return max(1, min(max_np, math.ceil(global_batch / base_batch)))
