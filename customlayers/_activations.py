"""The activations of ``linear_act``: their names (in csrc/common/activation.h's order), each with torch's
function, what its derivative reads (the forward's output, or the pre-activation ``x @ weight + bias``)
and that derivative from differentiable torch ops. The references, the torch.func rules, the modules,
convert(), the ONNX translations and the checks' messages all read this table; the compiled kernels'
checks (csrc/common/linear_act.cpp) are the authority on errors."""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "NAMES", "apply", "derivative", "names_text", "saves_output"]


class Activation(NamedTuple):
    function: Callable[[torch.Tensor], torch.Tensor]  # torch's own, e.g. F.gelu
    saves: str  # what linear_act_backward's `out` holds: "output", "pre" (the pre-activation) or "nothing"
    # g * act'(saved), from differentiable ops (so that gradients of gradients work)
    derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


_aten = torch.ops.aten


def _silu_derivative(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """g * silu'(z) (aten's silu_backward has no derivative of its own: its formula)."""
    s = torch.sigmoid(z)
    return g * s * (1 + z * (1 - s))


ACTIVATIONS: Dict[str, Activation] = {
    "none": Activation(lambda y: y, "nothing", lambda g, s: g),
    "relu": Activation(torch.relu, "output", lambda g, out: torch.where(out <= 0, 0, g)),  # NaN out passes g
    "gelu": Activation(F.gelu, "pre", lambda g, z: _aten.gelu_backward(g, z)),
    "gelu_tanh": Activation(lambda y: F.gelu(y, approximate="tanh"), "pre",
                            lambda g, z: _aten.gelu_backward(g, z, approximate="tanh")),
    "silu": Activation(F.silu, "pre", lambda g, z: _silu_derivative(g, z)),
    "tanh": Activation(torch.tanh, "output", lambda g, out: _aten.tanh_backward(g, out)),
    "sigmoid": Activation(torch.sigmoid, "output", lambda g, out: _aten.sigmoid_backward(g, out)),
}
NAMES = tuple(ACTIVATIONS)


def names_text() -> str:
    """The names for messages: 'none', 'relu', 'gelu', ..."""
    return ", ".join(f"'{name}'" for name in NAMES)


def apply(act: str, y: torch.Tensor) -> torch.Tensor:
    """act(y) with torch's function."""
    return ACTIVATIONS[act].function(y)


def saves_output(act: str) -> bool:
    """Whether act's derivative reads the forward's output (relu, tanh, sigmoid); else the pre-activation
    (gelu, gelu_tanh, silu) or nothing (none)."""
    return ACTIVATIONS[act].saves == "output"


def derivative(act: str, g: torch.Tensor, saved: Optional[torch.Tensor]) -> torch.Tensor:
    """g * act'(.), ``saved`` being what ACTIVATIONS[act].saves names."""
    return ACTIVATIONS[act].derivative(g, saved)


# ------------------------------------------------------------------ the torch forms convert() fuses
_nn = torch.nn
# Modules: the class -> the activation of an instance (nn.GELU's by its approximate).
MODULES: Dict[type, Callable[[torch.nn.Module], Optional[str]]] = {
    _nn.ReLU: lambda m: "relu",
    _nn.GELU: lambda m: {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate),
    _nn.SiLU: lambda m: "silu",
    _nn.Tanh: lambda m: "tanh",
    _nn.Sigmoid: lambda m: "sigmoid",
}
# Functions called as f(y), in place or not, -> (activation, the keyword arguments they may take).
FUNCTIONS: Dict[Callable, tuple] = {
    **{f: ("relu", {"inplace"}) for f in (torch.relu, torch.relu_, F.relu, F.relu_)},
    F.gelu: ("gelu", {"approximate"}),  # gelu_tanh with approximate='tanh'
    F.silu: ("silu", {"inplace"}),
    **{f: ("tanh", set()) for f in (torch.tanh, torch.tanh_, F.tanh)},
    **{f: ("sigmoid", set()) for f in (torch.sigmoid, torch.sigmoid_, F.sigmoid)},
}
# Tensor methods called as y.m() -> activation.
METHODS: Dict[str, str] = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh",
                           "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}


def of_call(function: Callable, kwargs: Dict[str, object]) -> Optional[str]:
    """The activation FUNCTIONS[function] computes with these keyword arguments, or None."""
    entry = FUNCTIONS.get(function)
    if entry is None or not set(kwargs) <= entry[1]:
        return None
    if entry[0] == "gelu":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(kwargs.get("approximate", "none"))
    return entry[0]
