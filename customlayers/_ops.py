"""Loading the compiled extension, fake (meta) implementations, and kernel-or-fallback selection.

The compiled library registers the ops as ``torch.ops.customlayers.*``. It is used only when it was
built for the running torch (same version, same CUDA), and ``CUSTOMLAYERS_FORCE_FALLBACK=1`` is not
set; otherwise every op runs its pure-PyTorch reference implementation and a one-time warning says why.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable, Dict, Optional

import torch

NAMESPACE = "customlayers"
OPS = ("centered", "linear_act", "linear_act_backward")

_loaded = False
_reason: Optional[str] = None      # why the extension is not used (None when it is)
_build: Dict[str, Optional[str]] = {}
_warned: set = set()


def _cpu_flags() -> set:
    """The running CPU's feature flags (Linux), or what torch's own CPU dispatch detected."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"avx2", "fma", "f16c"} if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else set()


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
    elif not set(_build_info.CPU_ISA_FLAGS) <= _cpu_flags():
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


_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


_has_kernel: Dict[tuple, bool] = {}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension has a kernel of `op` for `device_type` ('cpu', 'cuda', ...)."""
    found = _has_kernel.get((op, device_type))
    if found is None:
        key = _DEVICE_KEYS.get(device_type)
        found = (_loaded and key is not None
                 and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key))
        _has_kernel[(op, device_type)] = found
    return found


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
