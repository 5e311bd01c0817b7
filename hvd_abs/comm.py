"""The communication edge: everything the trainer needs from the other workers, behind one object.

`LocalComm` is one process. `HorovodComm` wraps `horovod.torch`, imported lazily in its methods so
that importing hvd_abs never imports Horovod. The trainer talks only to this interface:

    size, rank, allreduce_sum(tensors), allreduce_mean(tensors), broadcast_state(model, optimizer),
    broadcast_object(obj), allgather_object(obj), barrier()

Collectives over a list of tensors are fused (`hvd.grouped_allreduce`): one negotiation per call.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


SEPARATE_HOSTS_ENV = "HVD_ABS_SEPARATE_HOSTS"  # set to 1 by a launcher whose pool has other machines


class LocalComm:
    """A world of one process: every collective is the identity."""

    size = 1
    rank = 0
    local_rank = 0
    workers_here = 1

    def allreduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sum over ranks (here: the tensors themselves)."""
        return list(tensors)

    def allreduce_mean(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Mean over ranks (here: the tensors themselves)."""
        return list(tensors)

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        root_rank: int = 0) -> None:
        """Nothing to broadcast in a world of one."""

    def broadcast_buffers(self, model: nn.Module, root_rank: int = 0) -> None:
        """Nothing to broadcast in a world of one."""

    def broadcast_object(self, obj: Any, root_rank: int = 0, name: str = "hvd_abs.object") -> Any:
        """The object itself."""
        return obj

    def allgather_object(self, obj: Any) -> list[Any]:
        """[obj]."""
        return [obj]

    def barrier(self) -> None:
        """No-op."""


class HorovodComm:
    """Horovod (`horovod.torch`) collectives. Calls `hvd.init()` on construction."""

    def __init__(self) -> None:
        import horovod.torch as hvd  # lazy: only this class needs Horovod

        hvd.init()
        self._hvd = hvd

    def __repr__(self) -> str:
        return f"HorovodComm(rank={self.rank}, size={self.size})"

    @property
    def size(self) -> int:
        return self._hvd.size()

    @property
    def rank(self) -> int:
        return self._hvd.rank()

    @property
    def local_rank(self) -> int:
        return self._hvd.local_rank()

    @property
    def workers_here(self) -> int:
        """Workers sharing this machine's cores: Horovod's local size when the launcher said the
        hosts are separate machines (SEPARATE_HOSTS_ENV), else the whole world (the one-machine
        pool names this machine twice, and Horovod counts workers per name)."""
        return self._hvd.local_size() if os.environ.get(SEPARATE_HOSTS_ENV) == "1" else self._hvd.size()

    def allreduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sum over ranks, fused into one grouped allreduce."""
        if not tensors:
            return []
        # A stable name per call shape lets Horovod's response cache hit instead of churning
        # through one auto-generated name per call.
        return list(self._hvd.grouped_allreduce(list(tensors), op=self._hvd.Sum, name=f"hvd_abs.sum.{len(tensors)}"))

    def allreduce_sum_async_(self, tensor: torch.Tensor, name: str) -> Any:
        """Start summing `tensor` over ranks in place; wait(handle) ends it."""
        return self._hvd.allreduce_async_(tensor, op=self._hvd.Sum, name=name)

    def grouped_sum_async(self, tensors: Sequence[torch.Tensor], name: str) -> Any:
        """Start summing `tensors` over ranks (new tensors); wait(handle) returns them."""
        return self._hvd.grouped_allreduce_async(list(tensors), op=self._hvd.Sum, name=name)

    def wait(self, handle: Any) -> Any:
        return self._hvd.synchronize(handle)

    def allreduce_mean(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Mean over ranks, fused into one grouped allreduce."""
        if not tensors:
            return []
        return list(self._hvd.grouped_allreduce(list(tensors), op=self._hvd.Average,
                                                name=f"hvd_abs.mean.{len(tensors)}"))

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        root_rank: int = 0) -> None:
        """Make every rank's parameters, buffers (and optimizer state) equal to `root_rank`'s."""
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
        if optimizer is not None:
            # Broadcast the state dict as an object: hvd.broadcast_optimizer_state would take a
            # zero-gradient step on ranks with empty state (a drift with weight decay).
            state = self._hvd.broadcast_object(optimizer.state_dict(), root_rank=root_rank)
            optimizer.load_state_dict(state)

    def broadcast_buffers(self, model: nn.Module, root_rank: int = 0) -> None:
        """Make every rank's buffers (BatchNorm running stats) equal to `root_rank`'s."""
        buffers = [(name, b) for name, b in model.named_buffers()]
        if buffers:
            self._hvd.broadcast_parameters(buffers, root_rank=root_rank)

    def broadcast_object(self, obj: Any, root_rank: int = 0, name: str = "hvd_abs.object") -> Any:
        """`obj` from `root_rank` on every rank (pickled). Always named: Horovod's default name is
        the object's type, which differs between the root and the others (e.g. int vs NoneType)
        and then the collective never matches."""
        return self._hvd.broadcast_object(obj, root_rank=root_rank, name=name)

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        return self._hvd.allgather_object(obj, name="hvd_abs.gather")

    def barrier(self) -> None:
        """Wait for all ranks."""
        self._hvd.barrier()


def worker_device(kind: str, local_rank: int, visible: int | None = None) -> torch.device:
    """The device this worker computes on: "cpu", or its own GPU.

    horovodrun starts one process per slot on a host and each sees every GPU: without pinning,
    all of them would share GPU 0. Local rank i takes GPU i (mod the visible count, when a host
    has more slots than GPUs). A Ray actor holding one GPU sees only that one: index 0.
    `visible` defaults to torch.cuda.device_count().
    """
    if kind != "cuda":
        return torch.device(kind)
    visible = torch.cuda.device_count() if visible is None else visible
    if visible < 1:
        raise RuntimeError("--device cuda: no CUDA device is visible to this worker")
    return torch.device("cuda", local_rank % visible)


def make_comm(kind: str = "auto") -> LocalComm | HorovodComm:
    """`LocalComm` or `HorovodComm`. "auto": Horovod when launched by horovodrun (HOROVOD_RANK set)."""
    import os

    if kind == "local" or (kind == "auto" and "HOROVOD_RANK" not in os.environ):
        return LocalComm()
    return HorovodComm()

