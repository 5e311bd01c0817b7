"""The epoch-end curvature estimate that feeds the batch controller.

Methods (all through the second-order engine, hvd_abs.second_order):

- "lanczos" / "power": `top_eigenvalues` on all the given samples at once (the top eigenvalue of
  the Hessian of the mean loss over them). "power" with one 128-sample batch, tol 1e-2 and 10
  iterations is the reference (HessianFlow).
- "stochastic": streaming power iteration. Batch t (fresh samples each time) gives w = H_t v_t;
  its Rayleigh quotient v_t' H_t v_t is recorded and v_{t+1} = w / ||w||. Because v_t was made
  without batch t, each quotient is an unbiased sample of v_t' H v_t for the Hessian of the whole
  training set; the estimate is the mean of the quotients after `burn_in` iterations. The cost is
  that of the reference (one product per 128-sample batch, one batch per iteration), but it sees
  every batch once instead of one batch ten times, and it does not select the noisiest direction
  of a single small batch, which is what made the reference spread by 10x. It is biased low
  (the iterate is never exactly the top eigenvector) by a similar factor every epoch, which a ratio
  trigger (eig <= ref / 2) does not mind.

Every rank passes identical batches; the engine shards each batch over the ranks and allreduces
each product, so the estimate is the same on all ranks and independent of the world size.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

METHODS = ("stochastic", "lanczos", "power")


@dataclass
class Estimate:
    """One estimate: `eigenvalues[0]` is the value; `num_hvps` products were spent."""

    eigenvalues: list[float]
    num_hvps: int
    converged: bool
    samples: int


def stochastic_top_eigenvalue(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                              batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, seed: int = 0,
                              burn_in: int | None = None, comm: Any = None) -> Estimate:
    """Streaming power iteration, one Hessian-vector product per batch (see the module docstring).

    Args:
        burn_in: iterations whose quotient is not averaged (default: a third of the batches,
            at least 1 when there are 2 or more batches).
    """
    from hvd_abs.second_order import HessianOperator
    from hvd_abs.second_order.vecops import get as vector_ops

    if not batches:
        raise ValueError("no batches for the eigenvalue estimate")
    if burn_in is None:
        burn_in = min(len(batches) - 1, max(1, len(batches) // 3))
    gen = torch.Generator().manual_seed(seed)
    v = None
    quotients: list[float] = []
    for t, batch in enumerate(batches):
        # One product per batch: no graph to keep, so "double_backward" (build, use, free).
        with HessianOperator(model, criterion, [batch], method="double_backward", comm=comm) as H:
            ops = vector_ops(None, device=H.device)
            if v is None:
                v = H.random(gen)
                norm = math.sqrt(ops.dot(v, v))
                v = [x / norm for x in v]
            w = H(v)
        rq = ops.dot(w, v)  # v' H_t v, v unit
        if t >= burn_in:
            quotients.append(rq)
        norm = math.sqrt(ops.dot(w, w))
        if norm == 0 or not math.isfinite(norm):
            break
        v = [x / norm for x in w]
    value = sum(quotients) / len(quotients) if quotients else float("nan")
    return Estimate([value], num_hvps=len(batches), converged=bool(quotients),
                    samples=sum(int(len(y)) for _, y in batches))


def estimate_top_eigenvalue(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, method: str = "stochastic",
                            tol: float = 1e-2, max_iter: int = 10, seed: int = 0, comm: Any = None) -> Estimate:
    """Dispatch to the streaming estimator or to `hvd_abs.second_order.top_eigenvalues`."""
    if method == "stochastic":
        return stochastic_top_eigenvalue(model, criterion, batches, seed=seed, comm=comm)
    if method not in METHODS:
        raise ValueError(f"unknown eigen method {method!r}: use one of {', '.join(METHODS)}")
    from hvd_abs.second_order import top_eigenvalues

    res = top_eigenvalues(model, criterion, batches, k=1, tol=tol, max_iter=max_iter, method=method,
                          seed=seed, comm=comm)
    return Estimate(list(res.eigenvalues), res.num_hvps, bool(all(res.converged)),
                    sum(int(len(y)) for _, y in batches))
