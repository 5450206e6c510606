"""Functional forms of the custom layers, differentiable (gradcheck and gradgradcheck clean).

Each function calls its op, ``torch.ops.customlayers.*``, which runs the compiled kernel for the input's
device when there is one and the pure-PyTorch reference (customlayers.reference) otherwise; see
customlayers.backend_report().
Autograd is registered on the ops themselves, in C++ (csrc/autograd.cpp), so
``torch.ops.customlayers.*`` is differentiable too, under eager, torch.compile and torch.export, and
each backward is built from differentiable ops (double backward works). Under torch.func transforms and
forward AD, which refuse C++ autograd, these functions run the ops through Python autograd Functions
with jvp and batching rules instead (customlayers/_functorch.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _activations, _ops, reference
from ._functorch import CenteredFunction, LinearActFunction, transforms_active

__all__ = ["centered", "linear_act", "linear_glu"]

Dims = Optional[Union[int, Sequence[int]]]
# The annotations TorchScript reads (it has no Sequence): eager calls take any sequence of ints.
ScriptDims = Optional[Union[int, List[int]]]


def centered(x: torch.Tensor, dim: ScriptDims = None) -> torch.Tensor:
    """``x - x.mean()`` or, with ``dim``, ``x - x.mean(dim, keepdim=True)``.

    Args:
        x: floating-point tensor (float32, float64, float16, bfloat16), any shape and layout.
        dim: None (global mean, the book's CenteredLayer), an int, or a sequence of ints (under
            torch.jit.script: an int or a List[int]).
    """
    if not torch.jit.is_scripting():
        if isinstance(dim, int):
            dim = (dim,)
        elif dim is not None and not isinstance(dim, (tuple, list)):
            _bad_dim(dim)
        if _FUNCTIONS and (_functorch_active() or _forward_ad._current_level >= 0):  # transforms_active(), inlined
            return CenteredFunction.apply(x, dim)
        return _CENTERED(x, dim)
    # TorchScript: the op itself (its C++ autograd), as eager calls it outside the torch.func transforms.
    if isinstance(dim, int):
        return torch.ops.customlayers.centered(x, [dim])
    return torch.ops.customlayers.centered(x, dim)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               act: str = "relu", weight_t: bool = False) -> torch.Tensor:
    """``act(x @ weight + bias)`` in one fused op: the book's ``MyLinear`` forward (act='relu').

    Args:
        x: (*, in_features), any leading shape.
        weight: (in_features, out_features), the book's layout. A transposed view such as
            ``nn.Linear.weight.t()`` is used as is, without a copy.
        bias: (out_features,) or None.
        act: one of customlayers._activations.NAMES: 'none', 'relu', 'gelu' (erf, as F.gelu), 'gelu_tanh'
            (F.gelu(approximate='tanh')), 'silu', 'tanh', 'sigmoid'.
        weight_t: weight is (out_features, in_features), nn.Linear's layout: ``act(x @ weight.t() + bias)``
            with one autograd node fewer than passing ``weight.t()`` (what LinearReLU and FusedLinear do).
    """
    if not torch.jit.is_scripting():
        if _FUNCTIONS and (_functorch_active() or _forward_ad._current_level >= 0):  # transforms_active(), inlined
            x, weight, bias = _ops.autocast_inputs(x, weight, bias)
            if weight_t:  # the op's checks on the weight as given, then the Function on its (in, out) view
                reference.check_linear(x, weight, bias, "linear_act", weight_t)
                weight = weight.t()
            return LinearActFunction.apply(x, weight, bias, act)
        return _LINEAR_ACT(x, weight, bias, act, weight_t)
    return torch.ops.customlayers.linear_act(x, weight, bias, act, weight_t)


def linear_glu(x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor,
               bias_gate: Optional[torch.Tensor] = None, bias_up: Optional[torch.Tensor] = None,
               act: str = "silu", weight_t: bool = False) -> torch.Tensor:
    """A gated linear unit, ``act(x @ weight_gate + bias_gate) * (x @ weight_up + bias_up)``, in one op: the
    first half of a gated MLP (LLaMA's ``act_fn(gate_proj(x)) * up_proj(x)``; SwiGLU with act='silu',
    GeGLU with 'gelu' or 'gelu_tanh').

    Args:
        x: (*, in_features), any leading shape.
        weight_gate, weight_up: (in_features, hidden_features), the book's layout, of any strides; or with
            ``weight_t`` (hidden_features, in_features), nn.Linear's layout (``gate_proj.weight`` as it is).
        bias_gate, bias_up: (hidden_features,) or None.
        act: one of customlayers._activations.NAMES (default 'silu').
    """
    if not torch.jit.is_scripting():
        if _FUNCTIONS and (_functorch_active() or _forward_ad._current_level >= 0):  # transforms_active(), inlined
            # Under the transforms: the two products through linear_act's Function (its jvp and vmap rules),
            # then torch's activation and product.
            x, weight_gate, weight_up, bias_gate, bias_up = _ops.autocast_inputs(x, weight_gate, weight_up, bias_gate,
                                                                                 bias_up)
            reference.check_linear_glu(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t)
            if weight_t:
                weight_gate, weight_up = weight_gate.t(), weight_up.t()
            gate = LinearActFunction.apply(x, weight_gate, bias_gate, "none")
            return _activations.apply(act, gate) * LinearActFunction.apply(x, weight_up, bias_up, "none")
        return _LINEAR_GLU(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t)
    return torch.ops.customlayers.linear_glu(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t)


def _bad_dim(dim) -> None:
    raise TypeError(f"centered: dim must be an int or a sequence of ints, got {dim!r}")


_CENTERED, _LINEAR_ACT, _LINEAR_GLU = _ops.op("centered"), _ops.op("linear_act"), _ops.op("linear_glu")
# customlayers._functorch.transforms_active's two checks, called inline (one Python call fewer per op call).
_functorch_active = torch._C._are_functorch_transforms_active
# The ops carry C++ autograd when the compiled library is loaded: then the transforms need the Python
# Functions. Without it the ops are the references' PyTorch code, which the transforms take as it is.
_FUNCTIONS = _ops.loaded()
