"""Loading the compiled extension, fake (meta) implementations, and kernel-or-fallback selection.

The compiled library registers the ops as ``torch.ops.customlayers.*``. It is used only when it was
built for the running torch (same version, same CUDA), and ``CUSTOMLAYERS_FORCE_FALLBACK=1`` is not
set; otherwise every op runs its pure-PyTorch reference implementation and a one-time warning says why.
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from typing import Callable, Dict, Optional

import torch

from . import _cpu

NAMESPACE = "customlayers"
OPS = ("centered", "masked_uniform_", "linear_act", "linear_act_backward")

_loaded = False
_reason: Optional[str] = None      # why the extension is not used (None when it is)
_build: Dict[str, Optional[str]] = {}
_warned: set = set()
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_has_kernel: Dict[tuple, bool] = {}   # (op, device type) -> compiled kernel registered; filled at load


def _find_kernels() -> None:
    # Looked up once here, not per call: cheap calls, and nothing for torch.compile to trace.
    for name in OPS:
        for device_type, key in _DEVICE_KEYS.items():
            _has_kernel[(name, device_type)] = torch._C._dispatch_has_kernel_for_dispatch_key(
                f"{NAMESPACE}::{name}", key)


def _load() -> None:
    global _loaded, _reason
    if os.environ.get("CUSTOMLAYERS_FORCE_FALLBACK", "").strip() not in ("", "0"):
        _reason = "CUSTOMLAYERS_FORCE_FALLBACK is set"
        return
    spec = importlib.util.find_spec("customlayers._C")
    if spec is None or spec.origin is None:
        _reason = ("the compiled extension is not built (run `make build` or "
                   "`pip install --no-build-isolation .`)")
        return
    try:
        from . import _build_info
    except ImportError:
        _reason = "the compiled extension has no build record (customlayers/_build_info.py); rebuild it"
        return
    _build.update(torch=_build_info.TORCH_VERSION, cuda=_build_info.CUDA_VERSION, cpu_isa=_build_info.CPU_ISA)
    mismatch = None
    if _build_info.TORCH_VERSION != torch.__version__:
        mismatch = (f"it was built for torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
                    "is installed")
    elif _build_info.CUDA_VERSION is not None and _build_info.CUDA_VERSION != torch.version.cuda:
        mismatch = (f"its CUDA kernels were built with CUDA {_build_info.CUDA_VERSION} but torch uses "
                    f"CUDA {torch.version.cuda}")
    elif _build_info.CPU_ISA_FLAGS and not _cpu.has_avx2():
        mismatch = (f"it was built for CPUs with {', '.join(_build_info.CPU_ISA_FLAGS)}, which this CPU "
                    "lacks (rebuild here, or with CUSTOMLAYERS_CPU_ISA=default for a portable build)")
    if mismatch is None:
        try:
            torch.ops.load_library(spec.origin)
        except (OSError, RuntimeError) as exc:
            mismatch = f"loading {spec.origin} failed: {exc}"
    if mismatch is not None:
        _reason = f"customlayers: the compiled extension is not used: {mismatch}. Rebuild it."
        _warned.add(_reason)
        warnings.warn(_reason + " Falling back to pure-PyTorch implementations.", RuntimeWarning, stacklevel=3)
        return
    _loaded = True
    _find_kernels()


_load()


def loaded() -> bool:
    """True when the compiled extension is loaded and used."""
    return _loaded


def reason() -> Optional[str]:
    """Why the compiled extension is not used, or None."""
    return _reason


def build_info() -> Dict[str, Optional[str]]:
    """torch and CUDA versions the loaded extension was built with (empty when none is loaded)."""
    return dict(_build)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension has a kernel of `op` for `device_type` ('cpu', 'cuda', ...)."""
    return _has_kernel.get((op, device_type), False)


def op(name: str):
    """The compiled op's default overload, e.g. op('centered') is torch.ops.customlayers.centered.default."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def _warn_once(message: str) -> None:
    if message in _warned or torch.compiler.is_compiling():
        return
    _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether `op` on `device` runs a compiled kernel; when not, warn once with the reason."""
    if has_kernel(op, device.type):
        return True
    if not _loaded:
        _warn_once(f"customlayers: using the pure-PyTorch fallback for every op: {_reason}")
    else:
        built = "built without CUDA kernels" if device.type == "cuda" and _build.get("cuda") is None else \
            "no kernel for this device"
        _warn_once(f"customlayers: no compiled {device.type} kernel for {op} ({built}); "
                   f"using the pure-PyTorch fallback on {device.type}")
    return False


def register_fake(name: str) -> Callable:
    """Decorator registering a fake (meta) implementation when the extension is loaded."""
    def wrap(fn: Callable) -> Callable:
        if _loaded:
            torch.library.register_fake(f"{NAMESPACE}::{name}")(fn)
        return fn
    return wrap


def normalize_dims(dim, ndim: int, op: str):
    """The same validation as the C++ kernels (common/checks.cpp), for fakes and the fallback."""
    if dim is None:
        return None
    if isinstance(dim, int):
        dims = [dim]
    elif isinstance(dim, (list, tuple, torch.Size)):
        dims = list(dim)
    else:
        raise TypeError(f"{op}: dim must be an int or a sequence of ints, got {dim!r}")
    wrap = max(ndim, 1)
    seen = set()
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool):
            raise TypeError(f"{op}: dim must be an int or a sequence of ints, got {dim!r}")
        if not -wrap <= d < wrap:
            raise IndexError(f"{op}: dim {d} is out of range for a tensor with {ndim} dimension(s) "
                             f"(expected a value in [{-wrap}, {wrap - 1}])")
        w = d % wrap
        if ndim > 0 and w in seen:
            raise RuntimeError(f"{op}: dim {w} appears more than once in dim={dims}")
        seen.add(w)
    return dims


_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_floating(t: torch.Tensor, op: str, arg: str) -> None:
    if t.dtype not in _FLOATING:
        raise TypeError(f"{op}: expected {arg} to be a floating-point tensor (float32, float64, float16 or "
                        f"bfloat16), but got dtype {t.dtype}")


ACTIVATIONS = ("relu", "none")


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str,
                 op: str = "linear_act") -> None:
    """The same validation, exception types and messages as the C++ kernels (common/linear.cpp)."""
    check_floating(x, op, "x")
    check_floating(weight, op, "weight")
    if bias is not None:
        check_floating(bias, op, "bias")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: expected x and {name} to have the same dtype, but x is {x.dtype} and "
                            f"{name} is {t.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: expected all tensors on one device, but x is on {x.device} and {name} "
                               f"is on {t.device}")
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: expected weight to be 2-D (in_features, out_features), but got shape "
                           f"{list(weight.shape)}")
    if x.dim() < 1:
        raise RuntimeError(f"{op}: expected x to have at least 1 dimension (*, in_features), but got shape "
                           f"{list(x.shape)}")
    if x.shape[-1] != weight.shape[0]:
        raise RuntimeError(f"{op}: x's last dimension must equal weight's in_features (weight.shape[0]), but x "
                           f"has shape {list(x.shape)} and weight has shape {list(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[1]):
        raise RuntimeError(f"{op}: expected bias of shape [{weight.shape[1]}] (out_features,), but got shape "
                           f"{list(bias.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act must be 'relu' or 'none', but got '{act}'")


def linear_grad_weight_like(weight: torch.Tensor) -> torch.Tensor:
    """An uninitialized weight gradient in the layout the kernels give it: weight's own (a transposed
    view such as nn.Linear.weight.t() gets a transposed gradient)."""
    k, n = weight.shape
    if weight.stride(0) == 1 and weight.stride(1) != 1:
        return weight.new_empty((n, k)).t()
    return weight.new_empty((k, n))


@register_fake("linear_act")
def _linear_act_fake(x, weight, bias=None, act="relu"):
    check_linear(x, weight, bias, act)
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


@register_fake("linear_act_backward")
def _linear_act_backward_fake(grad, x, weight, out, act, output_mask):
    check_linear(x, weight, None, act, "linear_act_backward")
    return (x.new_empty(x.shape) if output_mask[0] else None,
            linear_grad_weight_like(weight) if output_mask[1] else None,
            x.new_empty((weight.shape[1],)) if output_mask[2] else None)


@register_fake("centered")
def _centered_fake(x, dim=None):
    check_floating(x, "centered", "x")
    normalize_dims(dim, x.dim(), "centered")
    return torch.empty_like(x)


# (significand bits, smallest normal exponent) of each floating dtype, as in csrc/common/masked_uniform.cpp.
_FORMATS = {torch.float16: (11, -14), torch.bfloat16: (8, -126), torch.float32: (24, -126),
            torch.float64: (53, -1022)}


def _round_up(x: float, dtype: torch.dtype) -> float:
    """The smallest value of `dtype` that is >= x (x finite and within the dtype's range)."""
    if x == 0:
        return 0.0
    precision, emin = _FORMATS[dtype]
    ulp = max(math.frexp(x)[1] - 1, emin) - (precision - 1)
    return math.ldexp(math.ceil(math.ldexp(x, -ulp)), ulp)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
            torch.float64: "Double"}[dtype]


def check_masked_uniform(t: torch.Tensor, low: float, high: float, threshold: float, offset: int = 0) -> None:
    """The argument checks of the masked_uniform_ kernels (common/masked_uniform.cpp), same errors."""
    op = "masked_uniform_"
    check_floating(t, op, "tensor")
    if not all(math.isfinite(v) for v in (low, high, threshold)):
        raise ValueError(f"{op}: expected finite bounds and threshold, but got low={low:g}, high={high:g}, "
                         f"threshold={threshold:g}")
    if not low < high:
        raise ValueError(f"{op}: expected low < high, but got low={low:g}, high={high:g}")
    if not threshold >= 0:
        raise ValueError(f"{op}: expected threshold >= 0, but got {threshold:g}")
    if offset < 0:
        raise ValueError(f"{op}: expected offset >= 0, but got {offset}")
    largest = torch.finfo(t.dtype).max
    if max(-low, high) > largest:
        raise ValueError(f"{op}: the bounds [{low:g}, {high:g}] exceed the {_dtype_name(t.dtype)} range "
                         f"(largest finite value {largest:g})")
    pos, neg = high > threshold, low < -threshold
    if not (pos or neg):
        raise ValueError(f"{op}: threshold={threshold:g} masks every value of [{low:g}, {high:g}): expected "
                         "low < -threshold or high > threshold")
    lo, hi, t_up = _round_up(low, t.dtype), -_round_up(-high, t.dtype), _round_up(threshold, t.dtype)
    for kept, first, last, a, b in ((pos, max(lo, t_up), hi, max(low, threshold), high),
                                    (neg, lo, min(hi, -t_up), low, min(high, -threshold))):
        if kept and first > last:
            raise ValueError(f"{op}: no {_dtype_name(t.dtype)} value lies in [{a:g}, {b:g}], the part of "
                             "[low, high] kept by the threshold")


@register_fake("masked_uniform_")
def _masked_uniform_fake(self, low=-10.0, high=10.0, threshold=5.0, seed=None, offset=0):
    check_masked_uniform(self, low, high, threshold, offset)
