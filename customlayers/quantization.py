"""Quantizing models built from (or convert()ed to) the custom layers.

LinearReLU and FusedLinear are nn.Linear subclasses, which PyTorch's quantizers pick by exact type. Importing
customlayers adds them to torch.ao.quantization's default mappings, each converted as the native float module
it stands for (``torch.ao.nn.intrinsic.LinearReLU``, i.e. nn.Linear + nn.ReLU fused, or ``nn.Linear``) would be:

- dynamic (``quantize_dynamic``): LinearReLU -> ``torch.ao.nn.intrinsic.quantized.dynamic.LinearReLU``,
  FusedLinear -> ``torch.ao.nn.quantized.dynamic.Linear``. torch's default qconfig_spec names nn.Linear only
  (and it matches exact types), so ``quantize_dynamic`` below extends the spec: where it names ``nn.Linear``,
  LinearReLU and FusedLinear get the same qconfig.
- eager static post-training quantization (``prepare`` / ``convert``): ``torch.ao.nn.intrinsic.quantized.LinearReLU``
  and ``torch.ao.nn.quantized.Linear``;
- eager quantization-aware training (``prepare_qat``): ``torch.ao.nn.intrinsic.qat.LinearReLU`` and
  ``torch.ao.nn.qat.Linear``, which ``convert`` then quantizes as usual.
- torchao (``quantize_``): its filter takes them for nn.Linear and swaps their weight for a quantized tensor
  subclass; their forward then runs ``torch.nn.functional.linear`` (+ ReLU) on it, which the subclass
  implements, instead of the customlayers op.

MyLinear (weight (in, out), not an nn.Linear) and CenteredLayer are left float by every flow.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
import torch.ao.nn.qat as nnqat
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn
from torch.ao.quantization import quantization_mappings

from .nn import FusedLinear, LinearGELU, LinearReLU, LinearSiLU

__all__ = ["DYNAMIC_MAPPINGS", "STATIC_MAPPINGS", "QAT_MAPPINGS", "quantize_dynamic"]


def _native_float(mod: FusedLinear) -> Optional[nn.Module]:
    """The native float module that ``mod`` (a FusedLinear: LinearReLU, or activation 'none') stands for, sharing
    its Parameters, with its qconfig and output observer (what the quantized modules' from_float read); None
    for the other activations, which torch.ao.quantization has no quantized module for."""
    if mod.activation not in ("relu", "none"):
        return None
    linear = mod.to_linear()
    linear.qconfig = mod.qconfig
    native = nni.LinearReLU(linear, nn.ReLU()) if mod.activation == "relu" else linear
    native.qconfig = mod.qconfig
    if hasattr(mod, "activation_post_process"):
        native.activation_post_process = mod.activation_post_process
    return native


def _entry(target: type) -> type:
    """A mapping entry (what torch.ao.quantization's mappings hold: a class with ``from_float``) that makes
    ``target`` of one of our modules as of its native float module; one with another activation than relu or
    none stays float, with a warning (a quantized input then reaches it with a clear error)."""
    def from_float(mod: FusedLinear, use_precomputed_fake_quant: bool = False) -> nn.Module:
        native = _native_float(mod)
        if native is None:
            warnings.warn(f"customlayers.quantization: {type(mod).__name__} (activation {mod.activation!r}) has no "
                          f"quantized counterpart in torch.ao.quantization (only Linear and Linear + ReLU have): "
                          f"left in float", UserWarning, stacklevel=2)
            return mod
        return target.from_float(native, use_precomputed_fake_quant=use_precomputed_fake_quant)
    return type(f"As{target.__name__}", (), {"from_float": staticmethod(from_float), "target": target,
                                             "__doc__": f"Converts to {target.__module__}.{target.__name__}."})


def _mappings(relu_target: type, linear_target: type) -> Dict[type, type]:
    """Our module classes -> entries: LinearReLU as Linear + ReLU, FusedLinear (of any activation) and the other
    named subclasses as Linear (those with an activation stay float, with a warning)."""
    linear_entry = _entry(linear_target)
    return {LinearReLU: _entry(relu_target), FusedLinear: linear_entry, LinearGELU: linear_entry,
            LinearSiLU: linear_entry}


DYNAMIC_MAPPINGS: Dict[type, type] = _mappings(nniqd.LinearReLU, nnqd.Linear)
STATIC_MAPPINGS: Dict[type, type] = _mappings(nniq.LinearReLU, nnq.Linear)
QAT_MAPPINGS: Dict[type, type] = _mappings(nniqat.LinearReLU, nnqat.Linear)


def register() -> None:
    """Adds the mappings above to torch.ao.quantization's default dynamic, static and QAT module mappings
    (which ``get_default_*_module_mappings()`` copy); only these classes' entries are added."""
    for default, ours in ((quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS, DYNAMIC_MAPPINGS),
                          (quantization_mappings.DEFAULT_STATIC_QUANT_MODULE_MAPPINGS, STATIC_MAPPINGS),
                          (quantization_mappings.DEFAULT_QAT_MODULE_MAPPINGS, QAT_MAPPINGS)):
        for cls, entry in ours.items():
            default.setdefault(cls, entry)


def quantize_dynamic(model: nn.Module, qconfig_spec: Optional[Any] = None, dtype: torch.dtype = torch.qint8,
                     mapping: Optional[Dict[type, type]] = None, inplace: bool = False) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` that quantizes LinearReLU and FusedLinear wherever it
    quantizes ``nn.Linear``: the qconfig_spec (None: torch's default for dtype, a set of types, or a dict of
    types / qualified names -> qconfig) gets LinearReLU and FusedLinear with nn.Linear's qconfig unless it names
    them itself; mapping (None: the default dynamic mapping) gets DYNAMIC_MAPPINGS. LinearReLU becomes
    ``torch.ao.nn.intrinsic.quantized.dynamic.LinearReLU``, FusedLinear ``torch.ao.nn.quantized.dynamic.Linear``.
    """
    from torch.ao.quantization.quantize import quantize_dynamic as torch_quantize_dynamic
    from torch.ao.quantization.qconfig import default_dynamic_qconfig, float16_dynamic_qconfig
    if qconfig_spec is None and dtype in (torch.qint8, torch.float16):
        linear_qconfig = default_dynamic_qconfig if dtype == torch.qint8 else float16_dynamic_qconfig
        qconfig_spec = {nn.Linear: linear_qconfig, nn.LSTM: linear_qconfig, nn.GRU: linear_qconfig,
                        nn.LSTMCell: linear_qconfig, nn.RNNCell: linear_qconfig, nn.GRUCell: linear_qconfig}
    if isinstance(qconfig_spec, set):
        qconfig_spec = set(qconfig_spec)
        if nn.Linear in qconfig_spec:
            qconfig_spec |= set(DYNAMIC_MAPPINGS)
    elif isinstance(qconfig_spec, dict):
        qconfig_spec = dict(qconfig_spec)
        if nn.Linear in qconfig_spec:
            for cls in DYNAMIC_MAPPINGS:
                qconfig_spec.setdefault(cls, qconfig_spec[nn.Linear])
    mapping = dict(quantization_mappings.get_default_dynamic_quant_module_mappings() if mapping is None else mapping)
    for cls, entry in DYNAMIC_MAPPINGS.items():
        mapping.setdefault(cls, entry)
    return torch_quantize_dynamic(model, qconfig_spec, dtype=dtype, mapping=mapping, inplace=inplace)


register()
