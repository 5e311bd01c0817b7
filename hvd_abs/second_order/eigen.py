"""Top-k Hessian eigenvalues (thick-restart Lanczos, or power iteration with deflation) and the
Hutchinson trace estimate.

Both solvers spend their time in Hessian-vector products (:mod:`hvd_abs.second_order.hvp`) and in
the Krylov vector phase (:mod:`hvd_abs.second_order.vecops`). Random start and probe vectors come
from a seeded CPU generator, so every rank of a distributed estimate draws the same ones, gets the
same (allreduced) products and takes the same decisions.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from hvd_abs.second_order import vecops as _vecops
from hvd_abs.second_order.comm import Comm
from hvd_abs.second_order.hvp import Batch, HessianOperator, Vector

log = logging.getLogger(__name__)

EIGEN_METHODS = ("lanczos", "power")


@dataclass
class EigenResult:
    """Top-k eigenpairs, eigenvalues sorted descending (algebraic order)."""

    eigenvalues: list[float]
    eigenvectors: list[Vector]
    num_hvps: int
    converged: list[bool]
    seconds: float
    method: str
    residuals: list[float] = field(default_factory=list)  # ||H y - theta y|| (lanczos) or last relative change (power)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary (no eigenvectors)."""
        return {"eigenvalues": self.eigenvalues, "converged": self.converged, "num_hvps": self.num_hvps,
                "seconds": self.seconds, "method": self.method, "residuals": self.residuals}


@dataclass
class TraceResult:
    """Hutchinson estimate of tr(H): ``value`` is the mean of v'Hv over Rademacher probes."""

    value: float
    stderr: float
    num_hvps: int
    converged: bool
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {"value": self.value, "stderr": self.stderr, "num_hvps": self.num_hvps,
                "converged": self.converged, "seconds": self.seconds}


def _check_common(tol: float, max_iter: int) -> None:
    if not tol > 0:
        raise ValueError(f"tol must be > 0 (a relative tolerance such as 1e-3), got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")


def top_eigenvalues(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    batches: Iterable[Batch], *, k: int = 1, tol: float = 1e-3, max_iter: int = 100,
                    method: str = "lanczos", seed: int = 0, comm: Comm | None = None,
                    hvp_method: str = "reuse", backend: str | None = None,
                    max_basis: int | None = None) -> EigenResult:
    """The k algebraically largest eigenvalues of the Hessian of the mean loss over ``batches``.

    Args:
        model, criterion, batches: as for :func:`hvd_abs.second_order.hvp`.
        k: how many eigenvalues (default 1).
        tol: relative tolerance (default 1e-3). Lanczos: every Ritz residual
            ``||H y - theta y|| <= tol * |theta|`` (the eigenvalue error is then far below tol);
            power: relative change of the Rayleigh quotient between iterations, as HessianFlow/PyHessian.
        max_iter: Lanczos: the most Hessian-vector products in all (default 100);
            power: the most iterations per eigenvalue (as the reference).
        method: ``"lanczos"`` (default; thick-restart Lanczos with full reorthogonalisation) or
            ``"power"`` (power iteration with deflation). Power iteration finds the eigenvalues of
            largest *magnitude*; they are the top algebraic ones only when those are not
            outweighed by a large negative eigenvalue (the usual case near a minimum).
        seed: seed of the random start vectors (default 0); the same on every rank.
        comm: None (default) = auto-detect Horovod with size > 1.
        hvp_method: how products are taken (default ``"reuse"``).
        backend: vector-op backend (default None = the best available).
        max_basis: Lanczos basis size before a thick restart (default max(2k + 20, 30), at most
            the number of parameters).

    Returns:
        :class:`EigenResult` with eigenvalues sorted descending, unit eigenvectors, products spent,
        per-value convergence flags and wall time. The model is left exactly as it was.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"unknown eigen method {method!r}: use one of {', '.join(EIGEN_METHODS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_common(tol, max_iter)
    t0 = time.perf_counter()
    with HessianOperator(model, criterion, batches, method=hvp_method, comm=comm) as H:
        n = sum(p.numel() for p in H.params)
        if k > n:
            raise ValueError(f"k={k} exceeds the number of trainable parameters ({n}); ask for at most {n}")
        ops = _vecops.get(backend, device=H.device)
        gen = torch.Generator().manual_seed(seed)
        if method == "lanczos":
            m = max(2 * k + 20, 30) if max_basis is None else max_basis
            if m < k + 2 and m < n:
                raise ValueError(f"max_basis={m} is too small for k={k}: use at least k + 2")
            res = _lanczos(H, ops, gen, k, tol, max_iter, min(m, n), n)
        else:
            res = _power(H, ops, gen, k, tol, max_iter)
    res.seconds = time.perf_counter() - t0
    return res


def _lanczos(H: HessianOperator, ops: _vecops.VectorOps, gen: torch.Generator, k: int, tol: float,
             max_iter: int, max_basis: int, n: int) -> EigenResult:
    """Krylov-Schur form of thick-restart Lanczos (Wu & Simon 2000, Stewart 2001).

    Invariant: A V = V T + f e_m', V orthonormal (m vectors), T symmetric (m x m), f = beta * w
    with w orthonormal to V. T is tridiagonal until the first restart and arrowhead-plus-
    tridiagonal after it; we keep it dense (m is small) and fill it from the Gram-Schmidt
    coefficients, which full reorthogonalisation computes anyway. Ritz pair (theta_i, V s_i) has
    residual norm |beta * s_i[m-1]|.
    """
    V: list[Vector] = []
    T = torch.zeros(max_basis + 1, max_basis + 1, dtype=torch.float64)
    w = H.random(gen)
    _, nrm = ops.orthonormalize_(w, [])
    V.append(w)
    theta = torch.zeros(0, dtype=torch.float64)
    S = torch.zeros(0, 0, dtype=torch.float64)
    resid = torch.zeros(0, dtype=torch.float64)
    conv = [False] * k
    while True:
        m = len(V)
        w = H(V[-1])
        coeffs, beta = ops.orthonormalize_(w, V)  # w <- (A v_m - V h)/beta, h = V' A v_m
        T[:m, m - 1] = coeffs
        T[m - 1, :m] = coeffs
        theta, S = torch.linalg.eigh(T[:m, :m])
        order = torch.argsort(theta, descending=True)
        theta, S = theta[order], S[:, order]
        resid = (beta * S[m - 1, :]).abs()
        scale = float(theta.abs().max()) if m else 0.0
        floor = 1e-6 * scale  # eigenvalues near 0 are judged against the spectrum's scale
        kk = min(k, m)
        conv = [bool(resid[i] <= tol * max(abs(float(theta[i])), floor)) for i in range(kk)] + [False] * (k - kk)
        # The Krylov space is (numerically) invariant: the Ritz values are exact for it.
        breakdown = beta <= 100 * torch.finfo(H.dtype).eps * max(scale, 1e-30)
        if breakdown:
            conv = [True] * kk + [False] * (k - kk)
        if all(conv) or H.num_products >= max_iter or (breakdown and m >= n):
            break
        if breakdown:
            # Continue in a fresh direction orthogonal to the invariant subspace found so far.
            w = H.random(gen)
            ops.orthonormalize_(w, V)
            beta = 0.0
        if m < max_basis:
            T[m, m - 1] = T[m - 1, m] = beta
            V.append(w)
            continue
        # Thick restart: keep the p best Ritz vectors, append w; T becomes [[diag(theta), b], [b', .]].
        p = min(m - 1, max(2 * k, k + 10))
        Y = []
        for i in range(p):
            y = H.zeros()
            ops.lincomb_(y, V, S[:, i], beta=0.0)
            Y.append(y)
        b = beta * S[m - 1, :p]
        T.zero_()
        T[:p, :p] = torch.diag(theta[:p])
        T[p, :p] = b
        T[:p, p] = b
        V = Y + [w]
        log.debug("lanczos restart after %d products: kept %d Ritz vectors", H.num_products, p)
    m = len(V) if len(theta) == len(V) else len(theta)
    kk = min(k, len(theta))
    vectors = []
    for i in range(kk):
        y = H.zeros()
        ops.lincomb_(y, V[:m], S[:, i], beta=0.0)
        vectors.append(y)
    return EigenResult(eigenvalues=[float(t) for t in theta[:kk]], eigenvectors=vectors, num_hvps=H.num_products,
                       converged=conv[:kk], seconds=0.0, method="lanczos",
                       residuals=[float(r) for r in resid[:kk]])


def _power(H: HessianOperator, ops: _vecops.VectorOps, gen: torch.Generator, k: int, tol: float,
           max_iter: int) -> EigenResult:
    """Power iteration with deflation, as HessianFlow/PyHessian: for each eigenvalue, start from a
    Gaussian vector, orthonormalise against the eigenvectors found so far, Hv, Rayleigh quotient
    v'Hv, stop when it changes by less than tol relative (|new - old| / (|old| + 1e-6))."""
    vals: list[float] = []
    vecs: list[Vector] = []
    conv: list[bool] = []
    changes: list[float] = []
    for _ in range(k):
        v = H.random(gen)
        ops.orthonormalize_(v, vecs)
        eig: float | None = None
        ok = False
        change = math.inf
        for _ in range(max_iter):
            hv = H(v)
            new = ops.dot(hv, v)
            ops.orthonormalize_(hv, vecs)  # deflate: stay orthogonal to the eigenvectors found
            v = hv
            if eig is not None:
                change = abs(new - eig) / (abs(eig) + 1e-6)
                if change < tol:
                    eig, ok = new, True
                    break
            eig = new
        vals.append(float(eig if eig is not None else 0.0))
        vecs.append(v)
        conv.append(ok)
        changes.append(change)
    order = sorted(range(k), key=lambda i: -vals[i])
    return EigenResult(eigenvalues=[vals[i] for i in order], eigenvectors=[vecs[i] for i in order],
                       num_hvps=H.num_products, converged=[conv[i] for i in order], seconds=0.0,
                       method="power", residuals=[changes[i] for i in order])


def hessian_trace(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  batches: Iterable[Batch], *, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                  comm: Comm | None = None, hvp_method: str = "reuse", backend: str | None = None,
                  min_samples: int = 10) -> TraceResult:
    """Hutchinson estimate of the Hessian's trace: mean of v'Hv over Rademacher probes v.

    Args:
        model, criterion, batches, comm, hvp_method, backend: as for :func:`top_eigenvalues`.
        tol: stop once stderr / |mean| < tol (default 1e-3), after at least ``min_samples``.
        max_iter: the most probes (= products), default 100.
        seed: seed of the probes (default 0); the same on every rank.
        min_samples: probes before the stopping rule is trusted (default 10; at most max_iter).

    Returns:
        :class:`TraceResult` (``value``, ``stderr`` = sample std / sqrt(probes), ``num_hvps``,
        ``converged``, ``seconds``).
    """
    _check_common(tol, max_iter)
    if min_samples < 2:
        raise ValueError(f"min_samples must be >= 2 (a standard error needs two probes), got {min_samples}")
    t0 = time.perf_counter()
    samples: list[float] = []
    converged = False
    stderr = math.inf
    with HessianOperator(model, criterion, batches, method=hvp_method, comm=comm) as H:
        ops = _vecops.get(backend, device=H.device)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(max_iter):
            v = H.random(gen, kind="rademacher")
            samples.append(ops.dot(H(v), v))
            if len(samples) >= 2:
                t = torch.tensor(samples, dtype=torch.float64)
                stderr = float(t.std(unbiased=True)) / math.sqrt(len(samples))
                mean = float(t.mean())
                if len(samples) >= min(min_samples, max_iter) and stderr < tol * abs(mean):
                    converged = True
                    break
        num = H.num_products
    value = float(sum(samples) / len(samples))
    if len(samples) < 2:
        stderr = math.inf
    return TraceResult(value=value, stderr=stderr, num_hvps=num, converged=converged,
                       seconds=time.perf_counter() - t0)
