"""Horovod adapter for :class:`hvd_abs.second_order.comm.Comm`. Imported lazily, and only when
``horovod.torch`` is already in ``sys.modules``: importing this package never imports Horovod."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

class HorovodComm:
    """One fused ``hvd.grouped_allreduce(op=hvd.Sum)`` per call; size/rank read at construction
    (an elastic resize builds a new one, since every estimate resolves its comm afresh)."""

    def __init__(self) -> None:
        import horovod.torch as hvd

        self._hvd = hvd
        self.size = int(hvd.size())
        self.rank = int(hvd.rank())
        # Names must match across ranks: a per-instance counter does, since every estimate makes a
        # fresh comm and all ranks issue the same reductions in the same order (a process-wide
        # counter would not, after an elastic resize adds a fresh worker).
        self._counter = itertools.count()

    def allreduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hvd = self._hvd
        name = f"hvd_abs.second_order.{next(self._counter)}"
        return list(hvd.grouped_allreduce(list(tensors), op=hvd.Sum, name=name))

    def __repr__(self) -> str:
        return f"HorovodComm(rank={self.rank}, size={self.size})"


def horovod_comm() -> HorovodComm | None:
    """A HorovodComm if Horovod is initialised with more than one worker, else None."""
    try:
        import horovod.torch as hvd

        if not hvd.is_initialized() or hvd.size() <= 1:
            return None
    except Exception as exc:  # noqa: BLE001 - a broken Horovod must not break a local estimate
        log.warning("Horovod is imported but unusable (%s); estimating on this process alone", exc)
        return None
    return HorovodComm()
