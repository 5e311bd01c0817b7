"""Convolutions whose gradient graph is cheap to differentiate again (for Hessian-vector products).

A Hessian-vector product by reverse-over-reverse differentiates the gradient graph. PyTorch's
own derivative of a convolution's backward (`_convolution_double_backward`) computes the weight
terms as a convolution of the transposed input with the transposed output gradient as the
*kernel* (a 32x32 kernel on ResNet-20's first stage), plus layout copies: about a fifth of a CPU
product. Here a convolution's backward is written with two autograd functions, one per gradient,
whose own derivatives are the fused kernels of a first-order backward (`convolution_backward`
with one output) and plain convolutions. Same function, same first derivatives, same second
derivatives; only which kernels compute them changes (ResNet-20 on CPU: product / gradient time
2.31 -> 2.14 at one thread, 2.43 -> 2.28 at two, in interleaved runs).

`fast_conv_double_backward(model)` switches a model's Conv1d/2d/3d modules (zeros padding given
as numbers) to this path for the block; first-order backward stays one fused call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _conv_backward(g_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conf: tuple, mask: tuple[bool, bool]):
    stride, padding, dilation, groups = conf
    return torch.ops.aten.convolution_backward(g_out, x, w, None, stride, padding, dilation, False,
                                               [0] * len(stride), groups, (*mask, False))


def _conv(x: torch.Tensor, w: torch.Tensor, conf: tuple) -> torch.Tensor:
    stride, padding, dilation, groups = conf
    return torch.convolution(x, w, None, stride, padding, dilation, False, [0] * len(stride), groups)


class _InputGrad(torch.autograd.Function):
    """g_x = d<conv(x, w), g_out>/dx (`x_ref` gives only the shape)."""

    @staticmethod
    def forward(ctx: Any, g_out: torch.Tensor, w: torch.Tensor, x_ref: torch.Tensor, conf: tuple) -> torch.Tensor:
        ctx.save_for_backward(g_out, w)
        ctx.conf = conf
        return _conv_backward(g_out, x_ref, w, conf, (True, False))[0]

    @staticmethod
    def backward(ctx: Any, gg_x: torch.Tensor):
        g_out, w = ctx.saved_tensors
        d_g_out = _conv(gg_x, w, ctx.conf) if ctx.needs_input_grad[0] else None
        d_w = _conv_backward(g_out, gg_x, w, ctx.conf, (False, True))[1] if ctx.needs_input_grad[1] else None
        return d_g_out, d_w, None, None


class _WeightGrad(torch.autograd.Function):
    """g_w = d<conv(x, w), g_out>/dw (`w_ref` gives only the shape)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g_out: torch.Tensor, w_ref: torch.Tensor, conf: tuple) -> torch.Tensor:
        ctx.save_for_backward(x, g_out)
        ctx.conf = conf
        return _conv_backward(g_out, x, w_ref, conf, (False, True))[1]

    @staticmethod
    def backward(ctx: Any, gg_w: torch.Tensor):
        x, g_out = ctx.saved_tensors
        d_x = _conv_backward(g_out, x, gg_w, ctx.conf, (True, False))[0] if ctx.needs_input_grad[0] else None
        d_g_out = _conv(x, gg_w, ctx.conf) if ctx.needs_input_grad[1] else None
        return d_x, d_g_out, None, None


class _Conv(torch.autograd.Function):
    """conv(x, w) + b whose backward, when it is itself recorded (create_graph=True), is made of
    _InputGrad and _WeightGrad."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conf: tuple) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.conf = conf
        stride, padding, dilation, groups = conf
        return torch.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # the graph of this backward is kept: differentiable pieces
            g_x = _InputGrad.apply(g_out, w, x.detach(), ctx.conf) if need_x else None
            g_w = _WeightGrad.apply(x, g_out, w.detach(), ctx.conf) if need_w else None
        else:  # first order only: one fused kernel, as PyTorch's own
            g_x, g_w, _ = _conv_backward(g_out, x, w, ctx.conf, (need_x, need_w))
        g_b = g_out.sum([0, *range(2, g_out.dim())]) if need_b else None
        return g_x, g_w, g_b, None


def _eligible(m: nn.Module) -> bool:
    return (type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and "forward" not in m.__dict__)


@contextlib.contextmanager
def fast_conv_double_backward(model: nn.Module) -> Iterator[int]:
    """Within the block, `model`'s eligible convolutions run through `_Conv`; yields how many."""
    patched = []
    for m in model.modules():
        if _eligible(m):
            conf = (list(m.stride), list(m.padding), list(m.dilation), m.groups)

            def forward(x: torch.Tensor, m: nn.Module = m, conf: tuple = conf) -> torch.Tensor:
                return _Conv.apply(x, m.weight, m.bias, conf)
            m.forward = forward
            patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
