"""The Hessian's spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan and Xiao
2019; PyHessian's `density`).

`steps` Lanczos steps from a random unit vector v give a symmetric T whose eigenpairs
(theta_i, s_i) are Gauss quadrature nodes and weights s_i[0]^2 of v's spectral measure: for a
polynomial f of degree below 2 x steps, sum_i w_i f(theta_i) = v' f(H) v. Averaged over probes,
that measure's expectation is the eigenvalue density (1/n) sum_j delta(t - lambda_j); `curve`
smooths it with a Gaussian kernel, as PyHessian plots it. Full reorthogonalisation (as in
top_eigenvalues) keeps spurious copies of converged eigenvalues out.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hvd_abs.second_order import vecops as _vecops
from hvd_abs.second_order.comm import Comm
from hvd_abs.second_order.hvp import Batch, HessianOperator


@dataclass
class DensityResult:
    """Per probe: quadrature nodes (Ritz values) and weights (each probe's sum to 1)."""

    nodes: list[list[float]]
    weights: list[list[float]]
    num_hvps: int
    seconds: float

    def curve(self, points: int = 1000, sigma: float | None = None) -> tuple[list[float], list[float]]:
        """(grid, density) smoothed by a Gaussian of width `sigma` (default: PyHessian's,
        sqrt(1e-5 x max(1, spread)) with spread the nodes' range); the density integrates to 1."""
        nodes = torch.tensor([x for p in self.nodes for x in p], dtype=torch.float64)
        weights = torch.tensor([w for p in self.weights for w in p], dtype=torch.float64) / len(self.nodes)
        lo, hi = float(nodes.min()), float(nodes.max())
        spread = hi - lo
        if sigma is None:
            sigma = math.sqrt(1e-5 * max(1.0, spread))
        pad = 0.01 * max(spread, 1e-12) + 3 * sigma
        grid = torch.linspace(lo - pad, hi + pad, points, dtype=torch.float64)
        kernel = torch.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return grid.tolist(), (kernel @ weights).tolist()

    def as_dict(self) -> dict[str, object]:
        return {"nodes": self.nodes, "weights": self.weights, "num_hvps": self.num_hvps,
                "seconds": round(self.seconds, 3)}


def hessian_density(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    batches: Iterable[Batch], *, steps: int = 90, probes: int = 1, seed: int = 0,
                    comm: Comm | None = None, hvp_method: str = "reuse", backend: str | None = None) -> DensityResult:
    """Stochastic Lanczos quadrature of the Hessian of the mean loss (model, criterion, batches,
    comm, hvp_method, backend: as for :func:`top_eigenvalues`; with Horovod, the samples are
    sharded and every rank draws the same probes). steps: Lanczos steps per probe (fewer when
    the Krylov space closes first); probes: random start vectors, averaged."""
    if steps < 1 or probes < 1:
        raise ValueError(f"steps and probes must be >= 1, got steps={steps}, probes={probes}")
    t0 = time.perf_counter()
    all_nodes, all_weights = [], []
    with HessianOperator(model, criterion, batches, method=hvp_method, comm=comm) as H:
        ops = _vecops.get(backend, device=H.device)
        gen = torch.Generator().manual_seed(seed)
        n = sum(p.numel() for p in H.params)
        for _ in range(probes):
            w = H.random(gen)
            ops.orthonormalize_(w, [])
            V = [w]
            T = torch.zeros(min(steps, n), min(steps, n), dtype=torch.float64)
            while True:
                m = len(V)
                w = H(V[-1])
                coeffs, beta = ops.orthonormalize_(w, V)
                T[:m, m - 1] = coeffs
                T[m - 1, :m] = coeffs
                scale = float(T[:m, :m].abs().max())
                if m == T.shape[0] or beta <= 100 * torch.finfo(H.dtype).eps * max(scale, 1e-30):
                    break  # (the steps asked, or an invariant Krylov space: the quadrature is exact)
                T[m, m - 1] = T[m - 1, m] = beta
                V.append(w)
            theta, S = torch.linalg.eigh(T[:m, :m])
            all_nodes.append(theta.tolist())
            all_weights.append((S[0, :] ** 2).tolist())
        num = H.num_products
    return DensityResult(nodes=all_nodes, weights=all_weights, num_hvps=num, seconds=time.perf_counter() - t0)
