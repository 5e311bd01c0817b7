"""The epoch-end curvature check of abs/absa: which training samples the top Hessian eigenvalue
is estimated on, and the estimate itself (batching/eig_trigger.py by default)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from hvd_abs.training.config import EIG_BATCH, TrainConfig
from hvd_abs.training.inputs import Inputs

log = logging.getLogger(__name__)

EigenFn = Callable[..., Any]


def _default_eigen_fn() -> EigenFn:
    from hvd_abs.batching.eig_trigger import estimate_top_eigenvalue

    return estimate_top_eigenvalue


class Curvature:
    """The estimate's samples (from seed and epoch) and its call to `eigen_fn`."""

    def __init__(self, cfg: TrainConfig, inputs: Inputs, train_y: torch.Tensor, device: torch.device,
                 eigen_fn: EigenFn | None = None) -> None:
        self.cfg, self.inputs, self.train_y, self.device = cfg, inputs, train_y, device
        self.eigen_fn = eigen_fn
        self._warned = False

    def batches(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """eig_samples training samples drawn from (seed, epoch), in batches of EIG_BATCH.

        Identical on every rank (the second-order engine shards them), independent of the world size.
        """
        n = int(self.train_y.shape[0])
        k = min(self.cfg.eig_samples, n)
        if k < self.cfg.eig_samples and not self._warned:
            log.warning("--eig-samples %d exceeds the %d training samples: using all of them",
                        self.cfg.eig_samples, n)
            self._warned = True
        gen = torch.Generator().manual_seed((self.cfg.seed * 7_919 + 104_729 * (epoch + 1)) % (2**63 - 1))
        idx = torch.randperm(n, generator=gen)[:k]
        return [(self.inputs.samples(idx[i:i + EIG_BATCH]), self.train_y[idx[i:i + EIG_BATCH]].to(self.device))
                for i in range(0, k, EIG_BATCH)]

    def estimate(self, model: nn.Module, comm: Any, epoch: int) -> tuple[float, int, float]:
        """(top eigenvalue, samples used, seconds) at the end of `epoch`, on the loss trained on."""
        if self.eigen_fn is None:
            self.eigen_fn = _default_eigen_fn()
        t0 = time.perf_counter()
        batches = self.batches(epoch)
        criterion = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        result = self.eigen_fn(model, criterion, batches, tol=self.cfg.eig_tol, max_iter=self.cfg.eig_max_iter,
                               method=self.cfg.eig_method, seed=self.cfg.seed + epoch, comm=comm)
        return float(result.eigenvalues[0]), sum(int(y.numel()) for _, y in batches), time.perf_counter() - t0
