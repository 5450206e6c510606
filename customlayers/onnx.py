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

from typing import Any, Callable, Dict, Optional, Sequence

import torch

try:
    from onnxscript import opset18 as op
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("customlayers.onnx needs onnxscript: pip install 'customlayers[onnx]' "
                      "(onnx, onnxscript, onnxruntime)") from exc

from . import _ops

__all__ = ["TRANSLATIONS", "export"]


def linear_act(x, weight, bias=None, act: str = "relu", weight_t: bool = False):
    """customlayers::linear_act: ``x @ weight + bias``, then ReLU when act='relu' (weight is (in, out), or
    (out, in) with weight_t)."""
    if act not in ("relu", "none"):
        raise ValueError(f"linear_act: act must be 'relu' or 'none', but got '{act}'")
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]) if weight_t else weight)
    if bias is not None:
        y = op.Add(y, bias)
    return op.Relu(y) if act == "relu" else y


def centered(x, dim: Optional[Sequence[int]] = None):
    """customlayers::centered: ``x - x.mean()``, or ``x - x.mean(dim, keepdim=True)``."""
    if dim:
        return op.Sub(x, op.ReduceMean(x, op.Constant(value_ints=list(dim)), keepdims=1))
    return op.Sub(x, op.ReduceMean(x, keepdims=1))


# The ops' default overloads to their translations, for torch.onnx.export's custom_translation_table.
TRANSLATIONS: Dict[Any, Callable] = {_ops.op("linear_act"): linear_act, _ops.op("centered"): centered}


def export(model: torch.nn.Module, args: tuple, **kwargs: Any):
    """``torch.onnx.export(model, args, dynamo=True, **kwargs)`` with the customlayers translations added to
    ``custom_translation_table`` (the caller's own entries win). Returns the ONNXProgram."""
    if not kwargs.pop("dynamo", True):
        raise ValueError("customlayers.onnx.export: the translations are for the dynamo exporter (dynamo=True), "
                         "but got dynamo=False")
    table = {**TRANSLATIONS, **(kwargs.pop("custom_translation_table", None) or {})}
    return torch.onnx.export(model, args, dynamo=True, custom_translation_table=table, **kwargs)
