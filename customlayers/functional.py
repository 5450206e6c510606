"""Functional forms of the custom layers, differentiable (gradcheck and gradgradcheck clean).

Each function runs the compiled kernel for its input's device when there is one, and the
pure-PyTorch reference (customlayers.reference) otherwise; see customlayers.backend().
Autograd is registered on the ops themselves, in C++ (csrc/autograd.cpp), so
``torch.ops.customlayers.*`` is differentiable too, under eager, torch.compile and torch.export, and
each backward is built from differentiable ops (double backward works).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _ops, reference

__all__ = ["centered", "linear_act"]

Dims = Optional[Union[int, Sequence[int]]]


def centered(x: torch.Tensor, dim: Dims = None) -> torch.Tensor:
    """``x - x.mean()`` or, with ``dim``, ``x - x.mean(dim, keepdim=True)``.

    Args:
        x: floating-point tensor (float32, float64, float16, bfloat16), any shape and layout.
        dim: None (global mean, the book's CenteredLayer), an int, or a sequence of ints.
    """
    dims = _ops.normalize_dims(dim, x.dim(), "centered")
    if _ops.use_kernel("centered", x.device):
        return _ops.op("centered")(x, dims)
    _ops.check_floating(x, "centered", "x")
    return reference.centered(x, dims)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               act: str = "relu") -> torch.Tensor:
    """``act(x @ weight + bias)`` in one fused op: the book's ``MyLinear`` forward (act='relu').

    Args:
        x: (*, in_features), any leading shape.
        weight: (in_features, out_features), the book's layout. A transposed view such as
            ``nn.Linear.weight.t()`` is used as is, without a copy.
        bias: (out_features,) or None.
        act: 'relu' or 'none'.
    """
    if _ops.use_kernel("linear_act", x.device):
        return _ops.op("linear_act")(x, weight, bias, act)
    _ops.check_linear(x, weight, bias, act)
    return reference.linear_act(x, weight, bias, act)
