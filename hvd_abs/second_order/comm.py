"""The communicator the second-order estimators use when the estimate is spread across workers.

Any object with ``size``, ``rank`` and ``allreduce_sum`` works (a structural protocol), so tests
and other launchers can pass their own. With ``comm=None`` the estimators auto-detect Horovod:
only if ``horovod.torch`` is already imported, initialised and has more than one worker, through
:class:`hvd_abs.comm.HorovodComm`. Horovod itself is never imported here.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from hvd_abs.comm import LocalComm

log = logging.getLogger(__name__)


@runtime_checkable
class Comm(Protocol):
    """What the estimators need from a communicator."""

    size: int
    rank: int

    def allreduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Element-wise sum of each tensor over all ranks, as ONE fused reduction."""
        ...


# The trivial communicator (one rank, no reduction) is the trainer's own: one class for both.
SingleProcess = LocalComm


def resolve_comm(comm: Comm | None) -> Comm:
    """``comm`` if given (checked), else Horovod when it is imported, initialised and has size > 1,
    else :class:`SingleProcess`."""
    if comm is not None:
        for attr in ("size", "rank", "allreduce_sum"):
            if not hasattr(comm, attr):
                raise TypeError(f"comm {comm!r} lacks `{attr}`: pass an object with .size, .rank and "
                                ".allreduce_sum(list[Tensor]) -> list[Tensor], or None to auto-detect Horovod")
        if not 0 <= comm.rank < comm.size:
            raise ValueError(f"comm has rank {comm.rank} outside [0, size={comm.size})")
        return comm
    if "horovod.torch" in sys.modules:
        try:
            hvd = sys.modules["horovod.torch"]
            if hvd.is_initialized() and hvd.size() > 1:
                from hvd_abs.comm import HorovodComm  # the trainer's Horovod edge, one fused reduction per call

                return HorovodComm()
        except Exception as exc:  # noqa: BLE001 - a broken Horovod must not break a local estimate
            log.warning("Horovod is imported but unusable (%s); estimating on this process alone", exc)
    return SingleProcess()
