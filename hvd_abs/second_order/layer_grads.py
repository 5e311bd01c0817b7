"""Layers whose gradient graph is cheap to differentiate again (for Hessian-vector products).

A Hessian-vector product by reverse-over-reverse differentiates the gradient graph, so the cost
of a product is set by how each layer's backward is differentiated:

- Convolutions: PyTorch's own derivative of a convolution's backward
  (`_convolution_double_backward`) computes the weight terms as a convolution of the transposed
  input with the transposed output gradient as the *kernel* (32x32 on ResNet-20's first stage),
  plus layout copies. Here the backward is two autograd functions, one per gradient, whose own
  derivatives are the fused kernels of a first-order backward (`convolution_backward` with one
  output) and plain convolutions.
- Eval-mode BatchNorm is a per-channel affine map, but its double backward is the generic
  training-mode formula (ten activation-sized products per layer). Here its backward is written
  with the few elementwise products the affine map needs.

Same functions, same first and second derivatives (to rounding); only the kernels change.
ResNet-20 on CPU, product / gradient time in interleaved runs: 2.31 -> 2.16 (convolutions) ->
2.05 (and BatchNorm) at one thread; 2.43 -> 2.33 -> 2.12 at two.

`fast_double_backward(model)` switches a model's Conv1d/2d/3d (zeros padding given as numbers)
and eval-mode affine BatchNorm1d/2d/3d with running statistics to these for the block; a
first-order backward stays one fused call, and under torch.func transforms the modules run their
own forward.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


class _BatchNormEval(torch.autograd.Function):
    """Eval-mode batch norm, x * (w * invstd) + (b - mean * w * invstd) per channel, with a
    backward of plain elementwise products (so its own derivative is those products' derivatives)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor,
                invstd: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, mean, invstd)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = w * invstd
        return torch.addcmul((b - mean * scale).view(shape), x, scale.view(shape))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, w, mean, invstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g_x = g * (w * invstd).view(shape) if need_x else None
        g_w = (g * ((x - mean.view(shape)) * invstd.view(shape))).sum(dims) if need_w else None
        g_b = g.sum(dims) if need_b else None
        return g_x, g_w, g_b, None, None


def _conv_forward(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    conf = (list(m.stride), list(m.padding), list(m.dilation), m.groups)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _Conv.apply(x, m.weight, m.bias, conf)
    return forward


def _batchnorm_forward(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if m.training:  # switched to training inside the block: the generic path
            return type(m).forward(m, x)
        return _BatchNormEval.apply(x, m.weight, m.bias, m.running_mean, torch.rsqrt(m.running_var + m.eps))
    return forward


def _switch(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The replacement forward for an eligible module, else None."""
    if "forward" in m.__dict__:  # already switched (nested operators) or patched by the user
        return None
    if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return _conv_forward(m)
    if (type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and not m.training and m.affine
            and m.running_mean is not None and m.running_var is not None):
        return _batchnorm_forward(m)
    return None


@contextlib.contextmanager
def fast_double_backward(model: nn.Module) -> Iterator[int]:
    """Within the block, `model`'s eligible layers run through the functions above; yields how many."""
    patched = []
    for m in model.modules():
        fast = _switch(m)
        if fast is None:
            continue

        def forward(x: torch.Tensor, m: nn.Module = m, fast: Callable = fast) -> torch.Tensor:
            if torch._C._are_functorch_transforms_active():  # torch.func inside the block (another
                return type(m).forward(m, x)                  # operator's forward_over_reverse)
            return fast(x)
        m.forward = forward
        patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
