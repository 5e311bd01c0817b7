"""--precision: the arithmetic of the training and test forward passes.

fp32: as the model is. bf16: each forward pass runs under torch.autocast in bfloat16 (matmuls
and convolutions; autocast keeps reductions and normalisation in float32), its logits handed
back in float32 so the loss is float32 too. Weights, gradients, optimizer state, the allreduce
and the growth check's Hessian stay float32: bfloat16 has 8 significant bits, and the halving test
compares two eigenvalues, so the second-order work is left exact. bfloat16 has float32's range,
so no loss scaling is needed. fp16 (for GPUs without bfloat16): the same under float16, whose
narrow range needs loss scaling (`grad_scaler`); FGSM's input gradient is scaled too, its sign
unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from hvd_abs.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast(nn.Module):
    """`inner`'s forward under autocast to `dtype` (bfloat16 or float16) on `device_type`, with
    float32 output. Shares `inner`'s parameters and modes (train()/eval() reach it as a
    submodule); holds no state of its own, so nothing about it is checkpointed."""

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            out = self.inner(x)
        return out.float()


def forward_model(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """The module the training and test forward passes call: `model` itself at fp32."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        return Autocast(model, device.type, torch.float16)
    # (torch.cuda.is_bf16_supported() says yes where bfloat16 is only emulated, e.g. a V100.)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise UserError(f"--precision bf16 needs a GPU with bfloat16 (compute capability 8.0 or newer); "
                        f"{torch.cuda.get_device_name(device)} has none: use --precision fp32")
    return Autocast(model, device.type)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaling (float16 has 5 exponent bits: small gradients would flush to zero):
    the loss is multiplied by the scale before backward, the summed gradients divided by it
    before the step, and a step whose gradients overflowed is skipped and the scale halved. A
    disabled scaler (fp32, bf16) passes everything through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
