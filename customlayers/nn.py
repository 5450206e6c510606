"""Drop-in nn.Module versions of the custom layers."""
from __future__ import annotations

import sys
import warnings
from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from . import _activations
from . import functional as F
from . import init as _init

__all__ = ["CenteredLayer", "FusedLinear", "GatedMLP", "LazyMyLinear", "LinearGELU", "LinearReLU", "LinearSiLU",
           "MyLinear", "convert"]


class CenteredLayer(nn.Module):
    """The book's ``CenteredLayer``: ``X - X.mean()``; with ``dim``, ``X - X.mean(dim, keepdim=True)``.

    >>> CenteredLayer()(torch.tensor([1.0, 2, 3, 4, 5]))
    tensor([-2., -1.,  0.,  1.,  2.])
    """

    def __init__(self, dim: Optional[Union[int, Sequence[int]]] = None):
        super().__init__()
        self.dim = dim if dim is None or isinstance(dim, int) else tuple(dim)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return F.centered(X, self.dim)
        # TorchScript: dim is typed by its value (None, int or a tuple); centered takes an int or a List[int].
        dim = self.dim
        if dim is None or isinstance(dim, int):
            return F.centered(X, dim)
        dims: List[int] = []
        for d in dim:
            dims.append(d)
        return F.centered(X, dims)

    def extra_repr(self) -> str:
        return "" if self.dim is None else f"dim={self.dim}"


_INITS = ("default", "randn")


class MyLinear(nn.Module):
    """The book's ``MyLinear``: ``relu(X @ weight + bias)`` with weight (in_units, units) and bias (units,),
    as one fused op (customlayers.functional.linear_act), differentiable unlike the book's ``.data``.
    The weight is a contiguous (in_units, units) Parameter, as the book's.

    Args:
        in_units, units: input and output features.
        bias: learn a bias (default True).
        activation: 'relu' (the book's), or any of customlayers._activations.NAMES ('none', 'gelu', 'gelu_tanh',
            'silu', 'tanh', 'sigmoid').
        init: 'default' (nn.Linear's initialization, see reset_parameters) or 'randn' (the book's:
            weight and bias drawn from torch.randn).

    >>> MyLinear(5, 3).weight.shape
    torch.Size([5, 3])
    """

    def __init__(self, in_units: int, units: int, bias: bool = True, activation: str = "relu",
                 device=None, dtype=None, init: str = "default"):
        super().__init__()
        if activation not in _activations.ACTIVATIONS:
            raise ValueError(f"MyLinear: activation must be one of {_activations.names_text()}, but got "
                             f"{activation!r}")
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
        # units == 0: MyLinear.__init__'s placeholders (or no outputs: nothing to fill). in_units == 0 (an
        # input of shape (*, 0)) still initializes: the bias gets zeros as in MyLinear(0, units), not
        # materialize()'s memory.
        if not self.has_uninitialized_params() and self.units != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: torch.Tensor) -> None:  # noqa: A002 (LazyModuleMixin's name)
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.in_units = input.shape[-1]
                self.weight.materialize((self.in_units, self.units))
                if self.bias is not None:
                    self.bias.materialize((self.units,))
                self.reset_parameters()

    def __prepare_scriptable__(self):
        """torch.jit.script calls it first: an unmaterialized layer has no shapes to compile."""
        if self.has_uninitialized_params():
            raise RuntimeError("LazyMyLinear: torch.jit.script needs its shapes: run a first input through it "
                               "(it then becomes a MyLinear), or use torch.jit.trace or torch.export with an "
                               "example input")
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # LazyModuleMixin's load hook has materialized the weight with the checkpoint's shape: take in_units
        # from it, as the first input would.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not nn.parameter.is_lazy(self.weight):
            self.in_units = self.weight.shape[0]


# The weight types FusedLinear (and its subclasses) runs the op on: plain tensors and Parameters, the tensors of
# torch.compile and torch.export (fake, functional); DTensor too (customlayers._dtensor registers the ops'
# rules), added by _subclass_forward when it first meets one (torch.distributed.tensor is not imported here).
_OP_TENSORS = {torch.Tensor, nn.Parameter, torch._subclasses.fake_tensor.FakeTensor,
               torch._subclasses.functional_tensor.FunctionalTensor}


def _assigned_by_torch_quantization() -> bool:
    """Whether the attribute assignment being made (in a property setter) comes from torch.ao.quantization:
    the first caller past nn.Module.__setattr__."""
    frame = sys._getframe(2)  # the setter's caller: nn.Module.__setattr__, or the assigning code itself
    while frame is not None and frame.f_code is nn.Module.__setattr__.__code__:
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("torch.ao.quantization")


class FusedLinear(nn.Linear):
    """``act(nn.Linear(x))`` as one linear_act op: the GEMM, the bias and the activation in one kernel, dX, dW
    and the bias gradient in one backward. A drop-in subclass of nn.Linear (``isinstance(m, nn.Linear)``
    holds, so initializers written for nn.Linear reach it) with nn.Linear's attributes, parameter names,
    shapes (weight (out_features, in_features), bias (out_features,)), repr fields and initialization, so
    state_dicts load both ways; only ``forward`` differs. The kernel reads the weight as it is, without
    copying it (weight_t=True).

    Args:
        in_features, out_features, bias: as nn.Linear's.
        activation: one of customlayers._activations.NAMES: 'none' (default: nn.Linear itself), 'relu',
            'gelu' (erf, as F.gelu), 'gelu_tanh' (F.gelu(approximate='tanh')), 'silu', 'tanh', 'sigmoid'.

    convert() makes one of each output layer (out_features <= OUTPUT_FEATURES, not followed by an
    activation), where the hand-written CPU kernel beats nn.Linear's GEMMs, and of each Linear followed by
    an activation (LinearReLU, LinearGELU, LinearSiLU: its named subclasses).
    ``FusedLinear.from_linear(linear, activation)`` shares linear's Parameters; ``to_linear()`` gives the
    nn.Linear part back, sharing them too.
    """

    _act = "none"  # the activation (the named subclasses' fixed one)
    __constants__ = [*nn.Linear.__constants__, "_act"]  # torch.jit.script reads _act as a constant

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "none",
                 device=None, dtype=None):
        if activation not in _activations.ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of {_activations.names_text()}, "
                             f"but got {activation!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self._act = activation

    @property
    def activation(self) -> str:
        return self._act

    # torch.ao.quantization's eager flows (quantize_dynamic, prepare, prepare_qat) give every module a qconfig
    # (None: leave it float) before converting and delete it after; a property so that this layer, left
    # without one, says so.
    __jit_unused_properties__ = ["qconfig"]

    @property
    def qconfig(self):
        d = self.__dict__
        if "_qconfig" in d:
            return d["_qconfig"]
        if "qconfig" in d:  # pickled before qconfig was a property
            return d["qconfig"]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute 'qconfig'")

    @qconfig.setter
    def qconfig(self, value) -> None:
        d = self.__dict__
        # Only a None that torch.ao.quantization gives is reported, not one the user sets to keep it float.
        if value is None and "_qconfig" not in d and "qconfig" not in d and _assigned_by_torch_quantization():
            name = type(self).__name__
            advice = (f"To quantize it, name {name} in the spec, or use customlayers.quantization.quantize_dynamic "
                      f"(docs/deploy.md)" if self._act in ("relu", "none") else
                      f"torch.ao.quantization has no quantized Linear + {self._act} either")
            warnings.warn(f"customlayers: {name} was given no qconfig, so quantization leaves it in float "
                          f"(torch.ao.quantization matches module types exactly: a spec naming nn.Linear does not "
                          f"cover its subclasses). {advice}.", UserWarning, stacklevel=3)
        d.pop("qconfig", None)
        d["_qconfig"] = value

    @qconfig.deleter
    def qconfig(self) -> None:
        self.__dict__.pop("_qconfig", None)
        self.__dict__.pop("qconfig", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        weight = self.weight
        if not torch.jit.is_scripting():
            if type(weight) not in _OP_TENSORS:
                return self._subclass_forward(input, weight)
        return F.linear_act(input, weight, self.bias, self._act, weight_t=True)

    @torch.jit.unused
    def _subclass_forward(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """A weight of a tensor subclass other than the ones the op serves (_OP_TENSORS), such as torchao's
        quantized weights (torchao.quantization.quantize_ puts them in every nn.Linear), runs through F.linear,
        which such subclasses implement, then the activation: the same result."""
        dtensor = sys.modules.get("torch.distributed.tensor")
        if dtensor is not None and isinstance(weight, dtensor.DTensor):
            _OP_TENSORS.add(type(weight))
            return F.linear_act(input, weight, self.bias, self._act, weight_t=True)
        return _activations.apply(self._act, torch.nn.functional.linear(input, weight, self.bias))

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: Optional[str] = None):
        """This layer over linear's Parameter objects, SHARED (no copy): training one trains the other.
        activation: FusedLinear's (default 'none'); a named subclass has its own."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        kwargs = {"activation": activation} if activation is not None else {}
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs)
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def to_linear(self) -> nn.Linear:
        """The nn.Linear part (without an activation), SHARING this module's Parameter objects (no copy)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        named = type(self) is not FusedLinear or self._act == "none"  # the class names the activation
        return super().extra_repr() + ("" if named else f", activation={self._act!r}")


class _NamedFusedLinear(FusedLinear):
    """A FusedLinear whose class names its activation: nn.Linear's constructor, activation fixed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, type(self)._act, device, dtype)


class LinearReLU(_NamedFusedLinear):
    """``relu(nn.Linear(x))`` as one fused op: a drop-in for ``nn.Sequential(nn.Linear(in, out), nn.ReLU())``
    (a FusedLinear with activation='relu'). ``LinearReLU.from_linear(linear)`` shares linear's Parameters."""

    _act = "relu"


class LinearGELU(_NamedFusedLinear):
    """``F.gelu(nn.Linear(x))`` (erf) as one fused op: a drop-in for ``nn.Sequential(nn.Linear(in, out),
    nn.GELU())`` (a FusedLinear with activation='gelu')."""

    _act = "gelu"


class LinearSiLU(_NamedFusedLinear):
    """``F.silu(nn.Linear(x))`` as one fused op: a drop-in for ``nn.Sequential(nn.Linear(in, out), nn.SiLU())``
    (a FusedLinear with activation='silu')."""

    _act = "silu"


class GatedMLP(nn.Module):
    """The gated MLP of LLaMA, Mistral, Qwen and Gemma, ``down_proj(act(gate_proj(x)) * up_proj(x))``
    (SwiGLU with activation='silu', GeGLU with 'gelu' or 'gelu_tanh'), its first half one linear_glu op (both
    products, the activation and the product in one kernel; in the backward one pass makes both gated
    gradients) and down_proj a FusedLinear (the linear_act op).

    The submodules are named and shaped as in those models (``gate_proj``, ``up_proj``: nn.Linear(in,
    hidden); ``down_proj``: an nn.Linear(hidden, out) subclass), so a LLaMA MLP's state_dict loads as it is,
    both ways.

    Args:
        in_features, hidden_features: the input and hidden sizes.
        out_features: the output size (default: in_features).
        bias: biases on the three projections (LLaMA's have none).
        activation: one of customlayers._activations.NAMES (default 'silu').
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, bias: bool = False,
                 activation: str = "silu", device=None, dtype=None):
        if activation not in _activations.ACTIVATIONS:
            raise ValueError(f"GatedMLP: activation must be one of {_activations.names_text()}, but got {activation!r}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.activation = activation
        self.gate_proj = nn.Linear(in_features, hidden_features, bias, **factory)
        self.up_proj = nn.Linear(in_features, hidden_features, bias, **factory)
        self.down_proj = FusedLinear(hidden_features, in_features if out_features is None else out_features, bias,
                                     **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        if not torch.jit.is_scripting():
            if type(gate.weight) not in _OP_TENSORS or type(up.weight) not in _OP_TENSORS:
                return self._subclass_forward(x)
        return self.down_proj(F.linear_glu(x, gate.weight, up.weight, gate.bias, up.bias, self.activation,
                                           weight_t=True))

    @torch.jit.unused
    def _subclass_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Weights of tensor subclasses linear_glu does not serve (torchao's quantized weights): their own
        nn.Linear forwards. DTensor (customlayers._dtensor has the op's rules) joins the served types."""
        dtensor = sys.modules.get("torch.distributed.tensor")
        gate, up = self.gate_proj, self.up_proj
        if dtensor is not None and isinstance(gate.weight, dtensor.DTensor) and type(up.weight) is type(gate.weight):
            _OP_TENSORS.add(type(gate.weight))
            return self.down_proj(F.linear_glu(x, gate.weight, up.weight, gate.bias, up.bias, self.activation,
                                               weight_t=True))
        return self.down_proj(_activations.apply(self.activation, gate(x)) * up(x))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# customlayers.nn.convert (and what pickles of converted modules name) as before convert() had its module.
from .fusion import OUTPUT_FEATURES, _rebuild_converted, convert  # noqa: E402,F401  (fusion imports this module)
