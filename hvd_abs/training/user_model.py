"""The run's model: a built-in one by name, or the caller's own (a module, or a function making
one), seeded alike on every rank and probed once on the data before anything is written."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from hvd_abs.errors import UserError
from hvd_abs.training.config import DEFAULT_MODELS


def make_model(cfg: Any, data: Any, model: nn.Module | Callable[[], nn.Module] | None) -> tuple[nn.Module, str]:
    """(the model, its name): cfg.model built for `data` when `model` is None; else the caller's
    module, or what its factory makes. Seeded with cfg.seed first: identical initial weights
    on every rank."""
    if model is None:
        from hvd_abs.models import build_model

        name = DEFAULT_MODELS.get(cfg.dataset, "cnn") if cfg.model == "auto" else cfg.model
        torch.manual_seed(cfg.seed)
        return build_model(name, data.num_classes, data.in_shape, mean=data.mean, std=data.std), name
    if not isinstance(model, nn.Module):  # a factory: seeded like the built-in models
        check_no_arguments_needed(model)
        torch.manual_seed(cfg.seed)
        made = model()
        if not isinstance(made, nn.Module):
            raise UserError(f"model= made a {type(made).__name__}, not a torch.nn.Module: pass a module, "
                            f"or a class or function returning one")
        model = made
    return model, type(model).__name__


def check_no_arguments_needed(factory: Callable[..., Any]) -> None:
    """Refuse a model factory that cannot be called as factory() (UserError naming the fix)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): calling it will tell
        return
    needed = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needed:
        raise UserError(f"model= is called with no arguments, but {getattr(factory, '__name__', 'it')} needs "
                        f"{', '.join(needed)}: pass e.g. model=lambda: MyNet(width=16)")


def check_model_fits(model: nn.Module, data: Any, device: torch.device) -> None:
    """A caller's own model, run once in eval mode and once in training mode, without gradients,
    on two training samples: one that fails on the data's inputs, or gives other than one logit
    per class (say, auxiliary heads in training mode), is refused here, before anything is
    written (and lazy modules take their shapes before the optimizer is made). The model's
    buffers (BatchNorm statistics) and torch's RNG (dropout) are left as they were. Raises
    UserError naming the shapes."""
    from hvd_abs.data.streaming import take

    x = take(data.train_x, torch.arange(2), device)
    want = (len(x), int(data.num_classes))
    for training in (False, True):
        mode = " in training mode" if training else ""
        try:
            out = forward_untouched(model, x, training)
        except Exception as exc:  # the model's own error, told with the shapes that caused it
            hint = ""
            if x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
                hint = " The inputs look channels-last (N, H, W, C): give x.permute(0, 3, 1, 2)."
            raise UserError(f"the model fails{mode} on a batch of inputs shaped {tuple(x.shape)} "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:240]}): make the model take the "
                            f"data's (N, C, H, W) inputs.{hint}") from None
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if shape != want:
            raise UserError(f"the model gives {shape}{mode} for a batch of {want[0]}: it must give {want} logits, "
                            f"one per class of the data ({want[1]} classes), in eval and training mode")


def forward_untouched(model: nn.Module, x: torch.Tensor, training: bool) -> Any:
    """model(x) without gradients in training or eval mode; the model's mode, its buffers (also one
    that forward replaces or adds) and the torch, Python and numpy RNG states as they were before."""
    import random

    import numpy as np

    # (A lazy module's buffers get their shape in this call: eval mode leaves them as made.)
    saved = [(module, name, b, b.detach().clone()) for module in model.modules()
             for name, b in module._buffers.items() if b is not None and not nn.parameter.is_lazy(b)]
    existed = {(id(module), name) for module in model.modules() for name in module._buffers}
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for module, name, buffer, value in saved:
                buffer.copy_(value)
                module._buffers[name] = buffer
            for module in model.modules():  # and none that forward registered anew
                for name in [n for n in module._buffers if (id(module), n) not in existed]:
                    del module._buffers[name]
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, x.device)
