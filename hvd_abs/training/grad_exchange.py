"""The update's sum over ranks, overlapped with its last backward pass.

Each parameter's gradient is sent (an async in-place allreduce) as soon as the update's last
backward pass has finished it, as hvd.DistributedOptimizer does, so the exchange runs while the
pass goes on through the earlier layers; the step's statistics (loss, accuracy, BatchNorm terms)
are sent just before that pass. Summing after the pass instead left the whole exchange on the
update's critical path: 6-15% of a ResNet-20 update between two hosts here, where a plain
Horovod loop hides it.

Only the last micro-batch's pass sends: the ones before it only accumulate into `.grad`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Sequence

import torch


class GradientExchange:
    """Over a comm with async allreduces (HorovodComm) and a world of more than one."""

    def __init__(self, params: Sequence[torch.nn.Parameter], comm: Any) -> None:
        self.params, self.comm = list(params), comm
        self._handles: dict[int, Any] = {}
        self._armed = False
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(functools.partial(self._ready, i))

    @staticmethod
    def supported(comm: Any) -> bool:
        return hasattr(comm, "allreduce_sum_async_")

    def _ready(self, i: int, p: torch.nn.Parameter) -> None:
        if self._armed and i not in self._handles:
            self._handles[i] = self.comm.allreduce_sum_async_(p.grad, f"hvd_abs.grad.{i}")

    @contextlib.contextmanager
    def sending(self, on: bool) -> Iterator[None]:
        """Within (when `on`): each gradient the backward pass completes is sent at once."""
        self._armed = on
        try:
            yield
        finally:
            self._armed = False

    def start(self, tensors: list[torch.Tensor]) -> Any:
        """Send the step's statistics (summed, not in place); wait() gives them back."""
        return self.comm.grouped_sum_async(tensors, f"hvd_abs.stats.{len(tensors)}")

    def wait(self, statistics: Any) -> list[torch.Tensor]:
        """Every parameter's gradient summed over ranks, in `.grad` (a parameter this rank's
        pass did not reach sends zeros, as every rank must take part); returns the summed
        statistics."""
        try:
            for i, p in enumerate(self.params):
                if i not in self._handles:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    self._handles[i] = self.comm.allreduce_sum_async_(p.grad, f"hvd_abs.grad.{i}")
            for handle in self._handles.values():
                self.comm.wait(handle)
            return list(self.comm.wait(statistics))
        finally:
            self._handles = {}
