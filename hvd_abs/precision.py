"""--precision: the arithmetic of the training and test forward passes.

fp32: as the model is. bf16: each forward pass runs under torch.autocast in bfloat16 (matmuls
and convolutions; autocast keeps reductions and normalisation in float32), its logits handed
back in float32 so the loss is float32 too. Weights, gradients, optimizer state, the allreduce
and the growth check's Hessian stay float32: bfloat16 has 8 significant bits, and the halving test
compares two eigenvalues, so the second-order work is left exact. bfloat16 has float32's range,
so no loss scaling is needed (unlike float16).
"""
from __future__ import annotations

import torch
from torch import nn

from hvd_abs.errors import UserError

PRECISIONS = ("fp32", "bf16")


class Autocast(nn.Module):
    """`inner`'s forward under autocast to bfloat16 on `device_type`, with float32 output. Shares
    `inner`'s parameters and modes (train()/eval() reach it as a submodule); holds no state of
    its own, so nothing about it is checkpointed."""

    def __init__(self, inner: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            out = self.inner(x)
        return out.float()


def forward_model(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """The module the training and test forward passes call: `model` itself at fp32."""
    if precision == "fp32":
        return model
    # (torch.cuda.is_bf16_supported() says yes where bfloat16 is only emulated, e.g. a V100.)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise UserError(f"--precision bf16 needs a GPU with bfloat16 (compute capability 8.0 or newer); "
                        f"{torch.cuda.get_device_name(device)} has none: use --precision fp32")
    return Autocast(model, device.type)
