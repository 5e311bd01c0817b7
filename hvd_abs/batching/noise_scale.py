"""The gradient noise scale B_noise = tr(Sigma) / |G|^2 (McCandlish et al. 2018, arXiv:1812.06162,
appendix A), from gradient norms at two batch sizes that an update computes anyway.

With B_small < B_big and the mean squared norms E|g_small|^2, E|g_big|^2 of gradients of
batches of those sizes, the unbiased estimates are

    |G|^2     = (B_big E|g_big|^2 - B_small E|g_small|^2) / (B_big - B_small)
    tr(Sigma) = (E|g_small|^2 - E|g_big|^2) / (1 / B_small - 1 / B_big)

Each is averaged over the epoch's updates before the ratio is taken, as the paper advises:
the ratio of two noisy per-update estimates is biased.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def noise_scale(small_sq: float, big_sq: float, b_small: int, b_big: int) -> float | None:
    """B_noise from the mean squared gradient norms at batch sizes b_small < b_big; None when
    they are not two sizes. A non-positive |G|^2 estimate (noise swamps the signal) is inf."""
    if not 0 < b_small < b_big:
        return None
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    if g2 <= 0:
        return math.inf if trace > 0 else None
    return max(trace, 0.0) / g2


def epoch_noise_scale(sums: Sequence[float], b_small: int, b_big: int) -> float | None:
    """B_noise from an epoch's sums (small_sq, small_n, big_sq, big_n); None before both were measured."""
    small_sq, small_n, big_sq, big_n = sums
    return noise_scale(small_sq / small_n, big_sq / big_n, b_small, b_big) if small_n and big_n else None


def sq_grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The squared norm of the parameters' gradients together, on their device (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).double().square().sum() if grads else torch.zeros((), dtype=torch.float64)
