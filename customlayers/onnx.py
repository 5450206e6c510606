"""ONNX export of models built from the custom layers: translations of the customlayers ops into ONNX
operators, for PyTorch's exporter (``torch.onnx.export(..., dynamo=True)``).

    import customlayers.onnx
    program = customlayers.onnx.export(model, (x,))              # or, with torch.onnx.export directly:
    program = torch.onnx.export(model, (x,), dynamo=True,
                                custom_translation_table=customlayers.onnx.TRANSLATIONS)

Needs onnxscript (``pip install customlayers[onnx]`` installs it with onnx and onnxruntime).
masked_uniform_ is an initializer, so it has no translation.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch

try:
    from onnxscript import opset18 as op
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("customlayers.onnx needs onnxscript: pip install 'customlayers[onnx]' "
                      "(onnx, onnxscript, onnxruntime)") from exc

from . import _activations, _ops

__all__ = ["TRANSLATIONS", "export"]


def _const(value: float, like):
    """A scalar constant in like's dtype."""
    return op.CastLike(op.Constant(value_float=value), like)


def _gelu(y, approximate: bool):
    """0.5 y (1 + erf(y / sqrt(2))), or with the tanh approximation 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))
    (opset 18 has no Gelu)."""
    if approximate:
        inner = op.Mul(_const(math.sqrt(2 / math.pi), y),
                       op.Add(y, op.Mul(_const(0.044715, y), op.Mul(y, op.Mul(y, y)))))
        t = op.Tanh(inner)
    else:
        t = op.Erf(op.Mul(y, _const(math.sqrt(0.5), y)))
    return op.Mul(op.Mul(_const(0.5, y), y), op.Add(_const(1.0, y), t))


# Each activation of customlayers._activations.NAMES as ONNX operators.
_ACTIVATIONS: Dict[str, Callable] = {
    "none": lambda y: y,
    "relu": lambda y: op.Relu(y),
    "gelu": lambda y: _gelu(y, approximate=False),
    "gelu_tanh": lambda y: _gelu(y, approximate=True),
    "silu": lambda y: op.Mul(y, op.Sigmoid(y)),
    "tanh": lambda y: op.Tanh(y),
    "sigmoid": lambda y: op.Sigmoid(y),
}
assert tuple(_ACTIVATIONS) == _activations.NAMES


def linear_act(x, weight, bias=None, act: str = "relu", weight_t: bool = False):
    """customlayers::linear_act: ``x @ weight + bias``, then the activation (weight is (in, out), or
    (out, in) with weight_t)."""
    if act not in _ACTIVATIONS:
        raise ValueError(f"linear_act: act must be one of {_activations.names_text()}, but got '{act}'")
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]) if weight_t else weight)
    if bias is not None:
        y = op.Add(y, bias)
    return _ACTIVATIONS[act](y)


def linear_glu(x, weight_gate, weight_up, bias_gate=None, bias_up=None, act: str = "silu", weight_t: bool = False):
    """customlayers::linear_glu: ``act(x @ weight_gate + bias_gate) * (x @ weight_up + bias_up)``."""
    if act not in _ACTIVATIONS:
        raise ValueError(f"linear_glu: act must be one of {_activations.names_text()}, but got '{act}'")
    return op.Mul(linear_act(x, weight_gate, bias_gate, act, weight_t), linear_act(x, weight_up, bias_up, "none", weight_t))


def centered(x, dim: Optional[Sequence[int]] = None):
    """customlayers::centered: ``x - x.mean()``, or ``x - x.mean(dim, keepdim=True)``."""
    if dim:
        return op.Sub(x, op.ReduceMean(x, op.Constant(value_ints=list(dim)), keepdims=1))
    return op.Sub(x, op.ReduceMean(x, keepdims=1))


# The ops' default overloads to their translations, for torch.onnx.export's custom_translation_table.
TRANSLATIONS: Dict[Any, Callable] = {_ops.op("linear_act"): linear_act, _ops.op("linear_glu"): linear_glu,
                                     _ops.op("centered"): centered}


def export(model: torch.nn.Module, args: tuple, **kwargs: Any):
    """``torch.onnx.export(model, args, dynamo=True, **kwargs)`` with the customlayers translations added to
    ``custom_translation_table`` (the caller's own entries win). Returns the ONNXProgram."""
    if not kwargs.pop("dynamo", True):
        raise ValueError("customlayers.onnx.export: the translations are for the dynamo exporter (dynamo=True), "
                         "but got dynamo=False")
    table = {**TRANSLATIONS, **(kwargs.pop("custom_translation_table", None) or {})}
    return torch.onnx.export(model, args, dynamo=True, custom_translation_table=table, **kwargs)
