"""Drop-in nn.Module versions of the custom layers."""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from . import functional as F
from . import init as _init

__all__ = ["CenteredLayer", "LazyMyLinear", "LinearReLU", "MyLinear", "convert"]


class CenteredLayer(nn.Module):
    """The book's ``CenteredLayer``: ``X - X.mean()``; with ``dim``, ``X - X.mean(dim, keepdim=True)``.

    >>> CenteredLayer()(torch.tensor([1.0, 2, 3, 4, 5]))
    tensor([-2., -1.,  0.,  1.,  2.])
    """

    def __init__(self, dim: Optional[Union[int, Sequence[int]]] = None):
        super().__init__()
        self.dim = dim if dim is None or isinstance(dim, int) else tuple(dim)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return F.centered(X, self.dim)

    def extra_repr(self) -> str:
        return "" if self.dim is None else f"dim={self.dim}"


_ACTIVATIONS = ("relu", "none")
_INITS = ("default", "randn")


class MyLinear(nn.Module):
    """The book's ``MyLinear``: ``relu(X @ weight + bias)`` with weight (in_units, units) and bias (units,),
    as one fused op (customlayers.functional.linear_act), differentiable unlike the book's ``.data``.

    Args:
        in_units, units: input and output features.
        bias: learn a bias (default True).
        activation: 'relu' (the book's) or 'none'.
        init: 'default' (nn.Linear's initialization, see reset_parameters) or 'randn' (the book's:
            weight and bias drawn from torch.randn).

    >>> MyLinear(5, 3).weight.shape
    torch.Size([5, 3])
    """

    def __init__(self, in_units: int, units: int, bias: bool = True, activation: str = "relu",
                 device=None, dtype=None, init: str = "default"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MyLinear: activation must be 'relu' or 'none', but got {activation!r}")
        if init not in _INITS:
            raise ValueError(f"MyLinear: init must be 'default' or 'randn', but got {init!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_units, self.units, self.activation, self.init = in_units, units, activation, init
        self.weight = nn.Parameter(torch.empty((in_units, units), **factory))
        self.bias = nn.Parameter(torch.empty(units, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialize the parameters in place. init='default': nn.Linear's initialization applied to
        the transposed layout (bounds from in_units: weight and bias ~ U(-1/sqrt(in_units), 1/sqrt(in_units)));
        under the same seed, the weight equals ``nn.Linear(in_units, units).weight.t()`` and the bias
        ``nn.Linear(in_units, units).bias``. init='randn': the book's ``torch.randn`` for both."""
        if self.init == "randn":
            with torch.no_grad():
                self.weight.normal_()
                if self.bias is not None:
                    self.bias.normal_()
            return
        _init.linear_(self.weight, self.bias, transposed=True)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return F.linear_act(X, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in_units={self.in_units}, units={self.units}, bias={self.bias is not None}, "
                f"activation={self.activation!r}" + (f", init={self.init!r}" if self.init != "default" else ""))


class LazyMyLinear(LazyModuleMixin, MyLinear):
    """MyLinear whose in_units is inferred from the first input (like nn.LazyLinear); it then becomes
    a MyLinear."""

    cls_to_become = MyLinear
    weight: UninitializedParameter
    bias: UninitializedParameter  # type: ignore[assignment]

    def __init__(self, units: int, bias: bool = True, activation: str = "relu", device=None, dtype=None,
                 init: str = "default"):
        factory = {"device": device, "dtype": dtype}
        super().__init__(0, 0, False, activation, init=init)  # parameters replaced below
        self.units = units
        self.weight = UninitializedParameter(**factory)
        if bias:
            self.bias = UninitializedParameter(**factory)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.in_units != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: torch.Tensor) -> None:  # noqa: A002 (LazyModuleMixin's name)
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.in_units = input.shape[-1]
                self.weight.materialize((self.in_units, self.units))
                if self.bias is not None:
                    self.bias.materialize((self.units,))
                self.reset_parameters()


class LinearReLU(nn.Module):
    """Drop-in replacement for ``nn.Sequential(nn.Linear(in, out), nn.ReLU())`` running one fused op.

    Parameters are nn.Linear's: same names, shapes (weight (out_features, in_features), bias
    (out_features,)) and initialization, so state_dicts load both ways. The kernel reads ``weight.t()``,
    a view, without copying it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization (the same random draws under the same seed)."""
        _init.linear_(self.weight, self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        return F.linear_act(input, self.weight.t(), self.bias, "relu")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearReLU":
        """A LinearReLU computing relu(linear(x)) that SHARES linear's Parameter objects (no copy):
        training one trains the other."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearReLU.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def to_linear(self) -> nn.Linear:
        """The nn.Linear part (without the ReLU), SHARING this module's Parameter objects (no copy)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` directly followed by ``nn.ReLU`` inside an ``nn.Sequential`` (at any
    depth) by a LinearReLU (sharing the Linear's Parameters) and the ReLU by ``nn.Identity``.

    state_dict keys are unchanged (LinearReLU has nn.Linear's parameter names; ReLU has none), so
    existing checkpoints load into the converted model and it computes the same outputs. A Linear used
    in several places (tied) becomes one LinearReLU object wherever it is followed by a ReLU; its
    Parameters stay shared everywhere, so gradients still accumulate into them. Forward hooks of the
    replaced modules are not carried over. With ``inplace=False`` the model is deep-copied first
    (ties within the model are kept in the copy).
    """
    if not inplace:
        model = copy.deepcopy(model)
    fused: Dict[int, LinearReLU] = {}
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            linear, relu = module._modules[first], module._modules[second]
            if type(linear) is nn.Linear and type(relu) is nn.ReLU:
                if id(linear) not in fused:
                    fused[id(linear)] = LinearReLU.from_linear(linear)
                module._modules[first] = fused[id(linear)]
                module._modules[second] = nn.Identity()
    return model
