"""Hessian-vector products of a model's mean loss, exact and optionally sharded across workers.

The Hessian is that of the mean loss over *all* samples of ``batches``: with a mean-reduced
criterion, batch b (n_b samples of N) contributes n_b/N times its loss. Only parameters with
``requires_grad=True`` take part; a parameter the loss does not use gets a zero product.

Three ways to compute H v (all give the same result to rounding):

- ``"reuse"`` (default): build the gradient graph once (``create_graph=True``) and run one
  backward through it per product. Fastest per product; holds every batch's graph in memory.
  (This and ``"double_backward"`` run convolutions and eval-mode BatchNorm through
  :mod:`.layer_grads`, whose gradient graph is cheaper to differentiate than PyTorch's own.)
- ``"double_backward"``: rebuild the gradient graph for each product (less memory, slower).
- ``"forward_over_reverse"``: ``torch.func.jvp`` over ``torch.func.grad`` with
  ``functional_call``; nothing is kept between products.

Distributed: given a ``comm`` (see :mod:`hvd_abs.second_order.comm`) of size > 1, every rank is
passed the same batches and keeps rank r's contiguous slice of each; each rank sums its shards'
size-weighted products and one fused allreduce per product adds them up, so the result is the
single-process result on the union of the batches.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from hvd_abs.second_order.comm import Comm, resolve_comm
from hvd_abs.second_order.layer_grads import fast_double_backward

log = logging.getLogger(__name__)

METHODS = ("reuse", "double_backward", "forward_over_reverse")
Batch = tuple[torch.Tensor, torch.Tensor]
Vector = list[torch.Tensor]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Runs the block with ``model`` in eval() mode, then restores exactly what was there: each
    submodule's training flag, every buffer's value (BatchNorm running statistics included) and
    each parameter's ``.grad`` (the same tensor object, None stays None)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):  # eval() keeps them; a custom module might not
                    b.copy_(saved)
        for p, g in grads:
            p.grad = g


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad=True, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's contiguous slice [lo, hi) of n samples; sizes differ by at most one."""
    return n * rank // size, n * (rank + 1) // size


class HessianOperator:
    """``H v`` for the mean loss of ``model`` under ``criterion`` over ``batches``; callable.

    Use it as a context manager (or call :meth:`close`): entering puts the model in eval() mode
    and, for ``method="reuse"``, builds and keeps the gradient graphs; leaving frees them and
    restores the model's mode, buffers and ``.grad`` exactly.

    Args:
        model: the network; its trainable parameters define the Hessian.
        criterion: mean-reduced loss, ``criterion(model(x), y)``.
        batches: iterable of ``(inputs, targets)``; read once. Moved to the parameters' device.
        method: ``"reuse"`` (default), ``"double_backward"`` or ``"forward_over_reverse"``.
        comm: None (default) = auto-detect Horovod with size > 1, else one process.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 batches: Iterable[Batch], *, method: str = "reuse", comm: Comm | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown HVP method {method!r}: use one of {', '.join(METHODS)}")
        self.model = model
        self.criterion = criterion
        self.method = method
        self.comm = resolve_comm(comm)
        named = trainable_parameters(model)
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to differentiate; "
                             "unfreeze at least one parameter")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.num_products = 0
        self.total_samples, self.shards = self._local_shards(batches)
        self._stack: contextlib.ExitStack | None = None
        self._graph: list[torch.Tensor | None] | None = None  # weighted gradient, with its graph

    # -- setup -----------------------------------------------------------------------------
    def _local_shards(self, batches: Iterable[Batch]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor, float]]]:
        full: list[Batch] = []
        for i, item in enumerate(batches):
            try:
                x, y = item
            except (TypeError, ValueError):
                raise ValueError(f"batch {i} is not an (inputs, targets) pair; pass an iterable of pairs") from None
            if len(x) != len(y):
                raise ValueError(f"batch {i} has {len(x)} inputs but {len(y)} targets")
            if len(x) > 0:
                full.append((x, y))
        total = sum(len(x) for x, _ in full)
        if total == 0:
            raise ValueError("no samples: `batches` is empty; pass at least one non-empty (inputs, targets) batch")
        shards = []
        for x, y in full:
            lo, hi = _shard(len(x), self.comm.rank, self.comm.size)
            if hi > lo:
                # weight n_shard / N: the shards of all ranks and batches sum to the global mean loss
                shards.append((x[lo:hi].to(self.device), y[lo:hi].to(self.device), (hi - lo) / total))
        return total, shards

    def __enter__(self) -> HessianOperator:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(preserved_state(self.model))
        if self.method != "forward_over_reverse":  # under torch.func transforms the switch stands aside
            self._stack.enter_context(fast_double_backward(self.model))
        if self.method == "reuse":
            self._graph = self._weighted_grad(create_graph=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Frees the kept graphs and restores the model (idempotent)."""
        self._graph = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    # -- products --------------------------------------------------------------------------
    def _weighted_grad(self, create_graph: bool) -> list[torch.Tensor | None]:
        """sum over local shards of w_s * grad(loss_s); None where no shard uses the parameter."""
        total: list[torch.Tensor | None] = [None] * len(self.params)
        for x, y, w in self.shards:
            loss = self.criterion(self.model(x), y) * w
            gs = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
            total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, gs)]
        return total

    def _backward_through(self, grads: Sequence[torch.Tensor | None], v: Vector, retain: bool) -> Vector:
        # Only gradients that depend on the parameters (have a graph) contribute to H v.
        pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None and g.requires_grad]
        out: Vector = [torch.zeros_like(p) for p in self.params]
        if not pairs:
            return out
        hv = torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[vi for _, vi in pairs],
                                 retain_graph=retain, allow_unused=True)
        return [h.detach() if h is not None else o for h, o in zip(hv, out)]

    def _local_product(self, v: Vector) -> Vector:
        if self.method == "reuse":
            if self._graph is None:
                raise RuntimeError("HessianOperator(method='reuse') must be entered first: "
                                   "use `with HessianOperator(...) as H:`")
            return self._backward_through(self._graph, v, retain=True)
        if self.method == "double_backward":
            out: Vector = [torch.zeros_like(p) for p in self.params]
            for x, y, w in self.shards:
                loss = self.criterion(self.model(x), y) * w
                gs = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                hv = self._backward_through(gs, v, retain=False)
                torch._foreach_add_(out, hv)
            return out
        return self._forward_over_reverse(v)

    def _forward_over_reverse(self, v: Vector) -> Vector:
        from torch.func import functional_call, grad, jvp

        # Frozen parameters and buffers enter as constants; trainable ones are the variables.
        consts = {n: b for n, b in self.model.named_buffers()}
        consts.update({n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad})
        primals = tuple(p.detach() for p in self.params)
        out: Vector = [torch.zeros_like(p) for p in self.params]
        for x, y, w in self.shards:
            def loss_of(*ps: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y, w: float = w) -> torch.Tensor:
                state = dict(consts)
                state.update(zip(self.names, ps))
                return self.criterion(functional_call(self.model, state, (x,)), y) * w

            argnums = tuple(range(len(primals)))
            _, hv = jvp(lambda *ps: grad(loss_of, argnums=argnums)(*ps), primals, tuple(v))
            torch._foreach_add_(out, [h.detach() for h in hv])
        return out

    def __call__(self, v: Sequence[torch.Tensor]) -> Vector:
        """H v for one vector (a list of tensors shaped like the trainable parameters)."""
        vs = self._check_vector(v)
        if self._stack is None:
            raise RuntimeError("HessianOperator must be entered first: use `with HessianOperator(...) as H:`")
        with torch.enable_grad():
            # Autograd may hand back strided results (conv weights come back channels-last here):
            # the vector ops write in place and Horovod reduces raw memory, so make them dense first.
            out = [t.contiguous() for t in self._local_product(vs)]
        if self.comm.size > 1:
            out = [t.contiguous() for t in self.comm.allreduce_sum(out)]  # one fused reduction per product
        self.num_products += 1
        return out

    def _check_vector(self, v: Sequence[torch.Tensor]) -> Vector:
        if len(v) != len(self.params):
            raise ValueError(f"the vector has {len(v)} tensors but the model has {len(self.params)} trainable "
                             "parameters; pass one tensor per parameter with requires_grad=True")
        out = []
        for i, (t, p) in enumerate(zip(v, self.params)):
            if t.shape != p.shape:
                raise ValueError(f"tensor {i} of the vector ({self.names[i]}) has shape {tuple(t.shape)}, "
                                 f"the parameter has {tuple(p.shape)}")
            out.append(t.detach().to(device=p.device, dtype=p.dtype))
        return out

    def zeros(self) -> Vector:
        """A zero vector shaped like the trainable parameters."""
        return [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]

    def random(self, generator: torch.Generator, kind: str = "gaussian") -> Vector:
        """A random vector drawn on the CPU from ``generator`` (so every rank draws the same one),
        then moved to the parameters' device. ``kind``: ``"gaussian"`` or ``"rademacher"``."""
        out = []
        for p in self.params:
            if kind == "rademacher":
                r = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).to(p.dtype) * 2 - 1
            else:
                r = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
            out.append(r.to(p.device).contiguous())
        return out


def hvp(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batches: Iterable[Batch], vectors: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]], *,
        method: str = "reuse", comm: Comm | None = None) -> Vector | list[Vector]:
    """Hessian-vector product(s) of the mean loss over all samples of ``batches``.

    Args:
        model: the network; only parameters with requires_grad=True take part (frozen ones are
            left out of the vectors; unused ones get zeros).
        criterion: mean-reduced loss ``criterion(model(x), y)``.
        batches: iterable of ``(inputs, targets)``; batch b is weighted by its size n_b / N.
        vectors: one vector (a list of tensors shaped like the trainable parameters) or a list of
            such vectors; several vectors share one graph with ``method="reuse"``.
        method: ``"reuse"`` (default), ``"double_backward"`` or ``"forward_over_reverse"``.
        comm: None (default) = auto-detect Horovod with size > 1; see :class:`~hvd_abs.second_order.comm.Comm`.

    Returns:
        H v as a list of tensors (one per trainable parameter), or a list of such lists when
        ``vectors`` was a list of vectors. The model's mode, buffers and ``.grad`` are unchanged.
    """
    many = len(vectors) > 0 and not isinstance(vectors[0], torch.Tensor)
    vecs: list[Sequence[torch.Tensor]] = list(vectors) if many else [vectors]  # type: ignore[list-item]
    with HessianOperator(model, criterion, batches, method=method, comm=comm) as H:
        out = [H(v) for v in vecs]
    return out if many else out[0]
