"""The optimizers `--optimizer` offers: a registry of small builders, one per name.

sgd and adamw are torch's; lars and lamb (You et al. 2017, 2019: a per-layer trust ratio, for
large batches) are timm's (`timm.optim.Lars`, `timm.optim.Lamb`), well kept and tested there.
Every optimizer keeps its state in `state_dict()`, which the checkpoint, the elastic commit and
the state sent to joining workers already carry; the growth LR rule sets each group's "lr".
A new one is a function of (params, cfg) under `@register_optimizer("name")`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from hvd_abs.training.config import TrainConfig

# (torch is imported by each builder: the CLI's --help reads the names without importing it.)
Builder = Callable[[list, "TrainConfig"], "torch.optim.Optimizer"]
OPTIMIZERS: dict[str, Builder] = {}
MOMENTUM_OPTIMIZERS = ("sgd", "lars")  # those --momentum and --nesterov apply to


def register_optimizer(name: str) -> Callable[[Builder], Builder]:
    def add(build: Builder) -> Builder:
        OPTIMIZERS[name] = build
        return build
    return add


def make_optimizer(params: list, cfg: "TrainConfig") -> "torch.optim.Optimizer":
    return OPTIMIZERS[cfg.optimizer](params, cfg)


@register_optimizer("sgd")
def sgd(params: list, cfg: Any) -> "torch.optim.Optimizer":
    import torch

    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@register_optimizer("adamw")
def adamw(params: list, cfg: Any) -> "torch.optim.Optimizer":
    import torch

    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@register_optimizer("lars")
def lars(params: list, cfg: Any) -> "torch.optim.Optimizer":
    from timm.optim import Lars

    return Lars(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


@register_optimizer("lamb")
def lamb(params: list, cfg: Any) -> "torch.optim.Optimizer":
    from timm.optim import Lamb

    # (timm's default clips the gradient to norm 1 inside the step; --clip-grad-norm is ours)
    return Lamb(params, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=None)
