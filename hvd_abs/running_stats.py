"""BatchNorm running statistics that do not depend on the world size.

In one process the micro-batches j = 0..K-1 of an update pass through a BatchNorm layer in turn,
and its running mean (and unbiased variance) moves as r <- (1 - m) r + m mu_j (m: the layer's
momentum), so after the update

    r_K = (1 - m)^K r_0 + m * sum_j (1 - m)^(K-1-j) mu_j.

On W workers each rank runs only some of the micro-batches, so its running statistics would take
another path on every world size, and so would everything computed in eval mode: the growth
check's Hessian eigenvalue (which decides the batch) and the test accuracy. Here each rank reads
mu_j of each of its micro-batches off its layers' own update (mu_j = (r_after - (1 - m) r_before)
/ m: no pass over the activations, a few multi-tensor ops per micro-batch for all layers), adds
its terms of the sum above, the terms of all ranks are summed in the update's fused allreduce,
and every rank sets r_K from r_0: the 1-process value to float rounding, the same on every rank.
(A layer in eval mode has mu_j = r_0 throughout, and the formula gives r_0 back.)

Only layers with a momentum and running statistics are handled; one with momentum=None (a
cumulative average) keeps its own updates (rank 0's are broadcast at each epoch end), and one with
momentum 0 never changes. The method assumes one update of a layer per forward: a layer used
twice, skipped, or run again by gradient checkpointing is warned about once, and its statistics
are then the same on every rank but not one process's.

`frozen_stats` serves ABSA: FGSM inputs are made in eval mode, so on the running statistics, and
a rank holds only its own partial chain of them within an update; made on those at the update's
start instead, they are the same on any world size.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def _tracking_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def running_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm running mean and variance of `model`."""
    return [b for m in _tracking_batchnorms(model) for b in (m.running_mean, m.running_var)]


@contextlib.contextmanager
def frozen_stats(buffers: list[torch.Tensor], values: list[torch.Tensor] | None) -> Iterator[None]:
    """Within: `buffers` hold `values` (None: as they are); after: what they held before."""
    if not buffers or values is None:
        yield
        return
    with torch.no_grad():
        now = torch._foreach_mul(buffers, 1.0)  # copies
        torch._foreach_copy_(buffers, values)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(buffers, now)


class RunningStats:
    """World-size-independent running statistics of `model`'s BatchNorm layers (see the module
    docstring). Per update: begin(K); before(j) and after() around micro-batch j's forward;
    payload() into the allreduce; finish(summed payload)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in _tracking_batchnorms(model) if m.momentum]
        self._momenta: list[float] = []  # per statistic (each layer's mean, then var): read at begin
        self._checked = False  # whether a first update showed one statistics update per forward
        self._k = self._j = 0
        self._start: list[torch.Tensor] = []
        self._before: list[torch.Tensor] = []
        self._terms: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []

    def _stats(self) -> list[torch.Tensor]:
        return [m.running_mean for m in self.layers] + [m.running_var for m in self.layers]

    @torch.no_grad()
    def begin(self, num_micro: int) -> None:
        """An update of `num_micro` micro-batches (over all ranks) begins."""
        self._k = num_micro
        self._momenta = [float(m.momentum) for m in self.layers] * 2  # (a recipe may anneal them)
        self._start = torch._foreach_mul(self._stats(), 1.0)  # copies
        self._terms = [torch.zeros_like(t) for t in self._start]
        self._counts = [m.num_batches_tracked.clone() for m in self.layers]

    @torch.no_grad()
    def before(self, j: int) -> None:
        """Micro-batch j (its index in the update, 0..K-1) passes next."""
        self._j = j
        self._before = torch._foreach_mul(self._stats(), 1.0)

    @torch.no_grad()
    def after(self) -> None:
        """Micro-batch j has passed: add its terms."""
        now = self._stats()
        # mu_j = (r_after - (1 - m) r_before) / m, weighted by (1 - m)^(K-1-j): in all
        # w / m * r_after - w (1 - m) / m * r_before.
        w = [(1.0 - m) ** (self._k - 1 - self._j) for m in self._momenta]
        torch._foreach_add_(self._terms, torch._foreach_mul(now, [wi / m for wi, m in zip(w, self._momenta)]))
        torch._foreach_add_(self._terms, torch._foreach_mul(self._before, [-wi * (1.0 - m) / m
                                                                          for wi, m in zip(w, self._momenta)]))

    def payload(self) -> torch.Tensor:
        """This rank's terms, then its layers' statistics-update counts in this update, flat, to
        be summed over ranks."""
        counts = [(m.num_batches_tracked - c).to(self._terms[0].dtype).reshape(1)
                  for m, c in zip(self.layers, self._counts)]
        return torch.cat([t.flatten() for t in self._terms] + counts)

    @torch.no_grad()
    def finish(self, summed: torch.Tensor) -> None:
        """Set every layer's statistics from the sum of all ranks' payloads."""
        parts = list(torch.split(summed.to(self._terms[0].device), [t.numel() for t in self._terms] + [1] * len(self.layers)))
        totals, counts = parts[:len(self._terms)], parts[len(self._terms):]
        decay = [(1.0 - m) ** self._k for m in self._momenta]
        new = torch._foreach_add(torch._foreach_mul(self._start, decay), torch._foreach_mul(totals, self._momenta))
        for stat, value in zip(self._stats(), new):
            stat.copy_(value.view_as(stat))
        for layer, count0, count in zip(self.layers, self._counts, counts):
            layer.num_batches_tracked.copy_(count0 + count.round().to(count0.dtype).reshape(count0.shape))
        if not self._checked:  # once (it reads the counts back: a GPU sync)
            self._checked = True
            odd = [i for i, c in enumerate(torch.cat(counts).tolist()) if self.layers[i].training and c != self._k]
            if odd:
                log.warning("%d BatchNorm layer(s) updated their running statistics other than once per micro-batch "
                            "(%s): used twice, skipped or recomputed (gradient checkpointing) in a forward? Their "
                            "statistics are the same on every worker but not those of one process",
                            len(odd), ", ".join(type(self.layers[i]).__name__ + f"#{i}" for i in odd[:3]))
