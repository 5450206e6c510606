"""customlayers: the custom layers of Dive into Deep Learning ch.5 on hand-written C++ and CUDA kernels.

    import customlayers
    layer = customlayers.nn.CenteredLayer()
    net.apply(customlayers.init.my_init)
    customlayers.backend()          # 'extension' or 'fallback'
    customlayers.try_gpu()          # the book's helper: cuda:0, or the CPU without a GPU
"""
from __future__ import annotations

from typing import Dict

from . import _dtensor, _ops, functional, init, nn, reference  # noqa: F401  (_ops loads the extension first)
from . import quantization  # noqa: F401  (adds LinearReLU and FusedLinear to the dynamic quantization mapping)
from .gpu import try_all_gpus, try_gpu
from .fusion import convert

__version__ = "0.1.0"
if _ops.loaded():  # without the library the ops are CompositeImplicitAutograd: DTensor sees their aten ops
    _dtensor.register_when_imported()
__all__ = ["backend", "backend_report", "convert", "functional", "init", "nn", "quantization", "reference",
           "try_all_gpus", "try_gpu"]


def backend() -> str:
    """'extension' when the compiled kernels are in use, 'fallback' when every op runs pure PyTorch
    (extension not built, built for another torch/CUDA, or CUSTOMLAYERS_FORCE_FALLBACK=1)."""
    return "extension" if _ops.loaded() else "fallback"


def backend_report() -> Dict[str, object]:
    """Details behind backend(): the reason for a fallback, the build's torch/CUDA versions and the CPU
    kernels' tier (build: cpu_tier, the one loaded; cpu_tier_reason, why; cpu_tiers_built; cpu_gemms, the
    GEMMs that tier's kernels run for each dtype on this machine, and why), and for
    each op and device whether a compiled kernel ('kernel') or the reference ('fallback') runs, and why
    the reference does ('why')."""
    return {
        "backend": backend(),
        "reason": _ops.reason(),
        "build": _ops.build_info(),
        "ops": {op: {dev: ("kernel" if _ops.has_kernel(op, dev) else "fallback") for dev in _ops.DEVICES}
                for op in _ops.OPS},
        "why": {op: {dev: _ops.fallback_reason(op, dev) for dev in _ops.DEVICES if not _ops.has_kernel(op, dev)}
                for op in _ops.OPS if not all(_ops.has_kernel(op, dev) for dev in _ops.DEVICES)},
    }
