"""Quantizing models built from (or convert()ed to) the custom layers.

LinearReLU and FusedLinear are nn.Linear subclasses, which PyTorch's quantizers pick by exact type:

- Dynamic quantization (``torch.ao.quantization.quantize_dynamic``): importing customlayers adds LinearReLU ->
  ``torch.ao.nn.intrinsic.quantized.dynamic.LinearReLU`` and FusedLinear ->
  ``torch.ao.nn.quantized.dynamic.Linear`` to PyTorch's default dynamic mapping, so the ones a ``qconfig_spec``
  names are quantized as their native counterparts. ``quantize_dynamic`` below is torch's with the spec
  extended: where it (or its default) names ``nn.Linear``, LinearReLU and FusedLinear get the same qconfig.
- torchao (``quantize_``): its filter takes them for nn.Linear and swaps their weight for a quantized tensor
  subclass; their forward then runs ``torch.nn.functional.linear`` (+ ReLU) on it, which the subclass
  implements, instead of the customlayers op. MyLinear (weight (in, out), not an nn.Linear) is left float.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from .nn import FusedLinear, LinearReLU

__all__ = ["DYNAMIC_MAPPINGS", "quantize_dynamic"]


class _DynamicLinearReLU:
    """A dynamic-quantization mapping entry: LinearReLU -> torch.ao.nn.intrinsic.quantized.dynamic.LinearReLU
    (the module quantize_dynamic makes of a fused ``torch.ao.nn.intrinsic.LinearReLU``)."""

    @staticmethod
    def from_float(mod: LinearReLU, use_precomputed_fake_quant: bool = False) -> nn.Module:
        import torch.ao.nn.intrinsic as nni
        import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
        linear = mod.to_linear()
        linear.qconfig = mod.qconfig
        fused = nni.LinearReLU(linear, nn.ReLU())
        fused.qconfig = mod.qconfig
        return nniqd.LinearReLU.from_float(fused, use_precomputed_fake_quant=use_precomputed_fake_quant)


class _DynamicFusedLinear:
    """A dynamic-quantization mapping entry: FusedLinear -> torch.ao.nn.quantized.dynamic.Linear (one with an
    activation, which that module has not, stays as it is, in float)."""

    @staticmethod
    def from_float(mod: FusedLinear, use_precomputed_fake_quant: bool = False) -> nn.Module:
        import torch.ao.nn.quantized.dynamic as nnqd
        if mod.activation != "none":
            return mod
        linear = mod.to_linear()
        linear.qconfig = mod.qconfig
        return nnqd.Linear.from_float(linear, use_precomputed_fake_quant=use_precomputed_fake_quant)


# What PyTorch's default dynamic mapping gets (register() at import).
DYNAMIC_MAPPINGS: Dict[type, type] = {LinearReLU: _DynamicLinearReLU, FusedLinear: _DynamicFusedLinear}


def register() -> None:
    """Adds DYNAMIC_MAPPINGS to torch.ao.quantization's default dynamic quantization mapping (which
    ``get_default_dynamic_quant_module_mappings()`` copies); only these classes' entries are added."""
    from torch.ao.quantization import quantization_mappings
    for cls, entry in DYNAMIC_MAPPINGS.items():
        quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS.setdefault(cls, entry)


def quantize_dynamic(model: nn.Module, qconfig_spec: Optional[Any] = None, dtype: torch.dtype = torch.qint8,
                     mapping: Optional[Dict[type, type]] = None, inplace: bool = False) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` that quantizes LinearReLU and FusedLinear wherever it
    quantizes ``nn.Linear``: the qconfig_spec (None: torch's default for dtype, a set of types, or a dict of
    types / qualified names -> qconfig) gets LinearReLU and FusedLinear with nn.Linear's qconfig unless it names
    them itself; mapping (None: the default dynamic mapping) gets DYNAMIC_MAPPINGS. LinearReLU becomes
    ``torch.ao.nn.intrinsic.quantized.dynamic.LinearReLU``, FusedLinear ``torch.ao.nn.quantized.dynamic.Linear``.
    """
    from torch.ao.quantization import quantization_mappings
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
