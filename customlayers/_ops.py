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

from . import _cpu

NAMESPACE = "customlayers"
OPS = ("centered",)

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


@register_fake("centered")
def _centered_fake(x, dim=None):
    check_floating(x, "centered", "x")
    normalize_dims(dim, x.dim(), "centered")
    return torch.empty_like(x)
