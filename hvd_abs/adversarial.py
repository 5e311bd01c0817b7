"""ABSA's adversarial part: FGSM inputs and the schedule of how many samples they replace.

- `fgsm` makes x + eps * sign(grad_x loss), clamped to [0, 1], on the current weights with the model
  in eval() mode (BatchNorm uses running statistics, as the reference). Models in hvd_abs normalise
  inside, so `eps` is on the [0, 1] pixel scale (0.005 by default) with no conversion.
- `AdversarialSchedule`: ratio r0 (`--adv-ratio`, 0.2) of every micro-batch is adversarial — its
  FIRST round(r * b) samples are replaced. The ratio halves at every growth of the global batch, is
  0 once the batch reached its cap, and is 0 from epoch E/2 on (epochs counted from 0).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hvd_abs.errors import UserError

log = logging.getLogger(__name__)


def fgsm(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor,
         eps: float) -> torch.Tensor:
    """FGSM inputs for (x, y): x (N, C, H, W) in [0, 1], y (N,). Returns a detached tensor like x.

    The model is put in eval() mode for the attack and its mode is restored; gradients are taken
    with respect to the input only, so the parameters' `.grad` are untouched.
    """
    if eps < 0:
        raise UserError(f"--adv-eps must be >= 0, got {eps}")
    if x.numel() == 0 or eps == 0:
        return x.detach().clone()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x_req = x.detach().clone().requires_grad_(True)
            loss = criterion(model(x_req), y)
            (grad,) = torch.autograd.grad(loss, x_req)
    finally:
        model.train(was_training)
    return (x.detach() + eps * grad.sign()).clamp_(0.0, 1.0)


class AdversarialSchedule:
    """Share of each micro-batch replaced by FGSM inputs (defaults: ratio 0.2, eps 0.005).

    Args:
        ratio: initial share (`--adv-ratio`), in [0, 1].
        eps: FGSM step on the [0, 1] pixel scale (`--adv-eps`).
        total_epochs: E; the ratio is 0 from epoch E / 2 on.
        at_max: the global batch starts at its cap (then the ratio is 0 from the start).
    """

    def __init__(self, ratio: float = 0.2, eps: float = 0.005, total_epochs: int = 90, at_max: bool = False) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"--adv-ratio must be in [0, 1], got {ratio}")
        if eps < 0:
            raise UserError(f"--adv-eps must be >= 0, got {eps}")
        self.initial_ratio = float(ratio)
        self.eps = float(eps)
        self.total_epochs = int(total_epochs)
        self.halvings = 0
        self.at_max = bool(at_max)

    def on_growth(self, at_max: bool) -> None:
        """The global batch grew (and may have reached its cap): halve the ratio."""
        self.halvings += 1
        self.at_max = self.at_max or at_max

    def ratio(self, epoch: int) -> float:
        """Share of each micro-batch made adversarial at (0-based) `epoch`."""
        if self.at_max or epoch >= self.total_epochs / 2:
            return 0.0
        return self.initial_ratio / (2 ** self.halvings)

    def num_adversarial(self, epoch: int, micro_batch: int) -> int:
        """How many of the first samples of a micro-batch of this size are replaced."""
        return min(micro_batch, int(round(self.ratio(epoch) * micro_batch)))

    def apply(self, model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor,
              epoch: int) -> tuple[torch.Tensor, int]:
        """(x with its first n samples replaced by FGSM inputs, n). x is not modified in place."""
        n = self.num_adversarial(epoch, x.shape[0])
        if n == 0:
            return x, 0
        x_adv = fgsm(model, criterion, x[:n], y[:n], self.eps)  # (n, C, H, W)
        return torch.cat([x_adv, x[n:]], dim=0), n

    def state_dict(self) -> dict[str, Any]:
        """Config and progress as plain numbers."""
        return {"initial_ratio": self.initial_ratio, "eps": self.eps, "total_epochs": self.total_epochs,
                "halvings": self.halvings, "at_max": self.at_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output."""
        self.initial_ratio = float(state["initial_ratio"])
        self.eps = float(state["eps"])
        self.total_epochs = int(state["total_epochs"])
        self.halvings = int(state["halvings"])
        self.at_max = bool(state["at_max"])
