"""The ops ``torch.ops.customlayers.*``: loading the compiled library, and the pure-PyTorch reference
registered inside the dispatcher wherever no compiled kernel serves, so that every caller (the Python
wrappers, torch.compile, torch.export, the torch.func transforms) sees the same ops either way.

- Each op is an entry of customlayers._opdefs: schema (customlayers/schemas.def), reference, fake.
- The compiled library (customlayers._C) defines every op schema (csrc/ops.cpp) and registers its
  kernels, autograd and autocast; when loaded it loads the CPU kernels of one tier (csrc/cpu_tier.cpp;
  the tiers: customlayers._cpu). It is
  loaded when it was built for the running torch and CUDA and ``CUSTOMLAYERS_FORCE_FALLBACK`` is unset
  (or 0); the fake (meta) implementations below come with it.
- Without it, the same schemas (read from customlayers/schemas.def) are defined here and
  the references (customlayers.reference) registered as CompositeImplicitAutograd kernels: autograd and
  every transform see their PyTorch ops.
- With it, a device that has no compiled kernel (CUDA in a CPU-only build), or that
  ``CUSTOMLAYERS_FORCE_FALLBACK=cpu`` (or ``cuda``, ``cpu,cuda``) names, gets the references as its
  kernels; the ops' C++ autograd still applies.
The first call that runs a reference warns once, with the reason.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import inspect
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

from . import _cpu
from ._opdefs import OPDEFS

NAMESPACE = "customlayers"
# Each op's schema (customlayers/schemas.def, which csrc/ops.cpp defines the ops from), reference and fake.
SCHEMAS = {name: d.schema for name, d in OPDEFS.items()}
OPS = tuple(OPDEFS)
REFERENCES: Dict[str, Callable] = {name: d.reference for name, d in OPDEFS.items()}
DEVICES = {"cpu": "CPU", "cuda": "CUDA"}

_loaded = False
_reason: Optional[str] = None      # why the compiled library is not used (None when it is)
_build: Dict[str, Optional[str]] = {}
_warned: set = set()
_has_kernel: Dict[tuple, bool] = {}        # (op, device type) -> a compiled kernel serves it
_fallback_why: Dict[tuple, str] = {}       # (op, device type) -> why the reference serves it
# The registrations made here for the whole process (torch.library.Library objects, reference_kernels).
_process_contexts = contextlib.ExitStack()
# A device's kernel may be overridden from Python twice (CUSTOMLAYERS_FORCE_FALLBACK=cpu, then a test's
# reference_kernels): torch before 2.14 refuses that unless asked.
_OVERRIDE = {"allow_override": True} if "allow_override" in inspect.signature(torch.library.Library.impl).parameters else {}


def _forced_devices() -> Optional[set]:
    """CUSTOMLAYERS_FORCE_FALLBACK: None (unset or 0), every device ('1', 'all', ...) or the ones named."""
    value = os.environ.get("CUSTOMLAYERS_FORCE_FALLBACK", "").strip().lower()
    if value in ("", "0"):
        return None
    named = {d.strip() for d in value.split(",")}
    return named if named <= set(DEVICES) else set(DEVICES) | {"library"}


def _load_library() -> Optional[str]:
    """Loads the compiled library; returns why it is not used, or None."""
    spec = importlib.util.find_spec("customlayers._C")
    if spec is None or spec.origin is None:
        return "the compiled extension is not built (run `make build` or `pip install --no-build-isolation .`)"
    try:
        from . import _build_info
    except ImportError:
        return "the compiled extension has no build record (customlayers/_build_info.py); rebuild it"
    _build.update(torch=_build_info.TORCH_VERSION, cuda=_build_info.CUDA_VERSION)
    mismatch = None
    if _build_info.TORCH_VERSION != torch.__version__:
        mismatch = (f"it was built for torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
                    "is installed")
    elif not hasattr(_build_info, "CPU_TIERS"):
        # Such a build has its CPU kernels in the core, compiled for the build machine's CPU.
        mismatch = "it was built before the CPU kernels came in run-time tiers, for one CPU"
    elif _build_info.CUDA_VERSION is not None and _build_info.CUDA_VERSION != torch.version.cuda:
        mismatch = (f"its CUDA kernels were built with CUDA {_build_info.CUDA_VERSION} but torch uses "
                    f"CUDA {torch.version.cuda}")
    if mismatch is None:
        try:
            torch.ops.load_library(spec.origin)
        except (OSError, RuntimeError) as exc:
            mismatch = f"loading {spec.origin} failed: {exc}"
    if mismatch is None:
        _read_cpu_tier([spec.origin])
        return None
    message = f"customlayers: the compiled extension is not used: {mismatch}. Rebuild it."
    _warned.add(message)
    warnings.warn(message + " Falling back to pure-PyTorch implementations.", RuntimeWarning, stacklevel=4)
    return message


def _warn_once(message: str) -> None:
    if message in _warned or torch.compiler.is_compiling():
        return
    _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _reference_kernel(name: str, message: str) -> Callable:
    """The reference of op `name` as a kernel that warns once, with `message`, when it first runs."""
    fn = REFERENCES[name]

    def kernel(*args, **kwargs):
        _warn_once(message)
        return fn(*args, **kwargs)

    kernel.__name__ = f"{name}_reference"
    return kernel


def _define_with_references() -> None:
    """No compiled library: the schemas and the references as CompositeImplicitAutograd kernels."""
    lib = torch.library.Library(NAMESPACE, "DEF")
    _process_contexts.callback(lib._destroy)  # holds the registrations for the process
    message = f"customlayers: using the pure-PyTorch fallback for every op: {_reason}"
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _reference_kernel(name, message), "CompositeImplicitAutograd")
        for device in DEVICES:
            _has_kernel[(name, device)] = False
            _fallback_why[(name, device)] = _reason
    # Autocast as csrc/autocast.cpp does it: the floating inputs in the autocast dtype, like nn.Linear's.
    for name, d in OPDEFS.items():
        if d.autocast:
            for device, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
                lib.impl(name, _autocast_kernel(name, device), key)


def _autocast_kernel(name: str, device: str) -> Callable:
    """Op `name`'s autocast kernel on `device`: its floating tensor arguments cast (autocast_inputs), then
    the op with autocast off."""
    def kernel(*args, **kwargs):
        values = [*args, *kwargs.values()]
        cast = iter(autocast_inputs(*(a for a in values if isinstance(a, torch.Tensor))))
        values = [next(cast) if isinstance(a, torch.Tensor) else a for a in values]
        args, kwargs = tuple(values[:len(args)]), dict(zip(kwargs, values[len(args):]))
        with torch.autocast(device, enabled=False):
            return op(name)(*args, **kwargs)
    kernel.__name__ = f"{name}_autocast_{device}"
    return kernel


def autocast_inputs(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> list:
    """Under autocast, the floating inputs other than float64 cast to the autocast dtype, as the compiled
    ops' autocast kernels (csrc/autocast.cpp) cast them."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return [x, *tensors]
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, *tensors)]


@contextlib.contextmanager
def reference_kernels(devices: Sequence[str], why: str = "CUSTOMLAYERS_FORCE_FALLBACK names this device",
                      ops: Sequence[str] = OPS) -> Iterator[None]:
    """Registers the references as the kernels of `ops` (every op) on `devices` (over the compiled ones) until
    the context exits, when the compiled kernels serve again. CUSTOMLAYERS_FORCE_FALLBACK=cpu uses it for the
    process; tests use it to run the fallback in-process."""
    lib = torch.library.Library(NAMESPACE, "IMPL")
    # Held here: a context the process keeps (CUSTOMLAYERS_FORCE_FALLBACK) exits at interpreter shutdown, after
    # the module's globals may have been cleared.
    has_kernel, fallback_why = _has_kernel, _fallback_why
    saved = dict(has_kernel), dict(fallback_why)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*previously registered.*")
        for name in ops:
            for device in devices:
                message = f"customlayers: no compiled {device} kernel for {name} ({why}); " \
                          f"using the pure-PyTorch fallback on {device}"
                lib.impl(name, _reference_kernel(name, message), DEVICES[device], **_OVERRIDE)
                _has_kernel[(name, device)] = False
                _fallback_why[(name, device)] = why
    try:
        yield
    finally:
        lib._destroy()
        has_kernel.clear(), fallback_why.clear()
        has_kernel.update(saved[0]), fallback_why.update(saved[1])


def _read_cpu_tier(paths) -> None:
    """The CPU tier the loaded library chose (csrc/cpu_tier.cpp), from the first of `paths` that reports
    it, into the build info: cpu_tier ('' when none is loaded), cpu_tier_reason, cpu_tiers_built."""
    for path in paths:
        try:
            report = ctypes.CDLL(path).customlayers_cpu_tier_report
        except (OSError, AttributeError):
            continue
        report.restype = ctypes.c_char_p
        text = report().decode(errors="replace")  # "tier\nreason\nbuilt": the reason may hold newlines (dlerror)
        tier, rest = text.split("\n", 1)
        why, built = rest.rsplit("\n", 1)
        _build.update(cpu_tier=tier, cpu_tier_reason=why, cpu_tiers_built=tuple(built.split(",")) if built else ())
        global _tier_path
        _tier_path = os.path.join(os.path.dirname(path), _cpu.tier_library(tier)) if tier else None
        return


_tier_path: Optional[str] = None  # the loaded CPU tier's library, asked for cpu_gemms when build_info() is


def _read_cpu_gemms(tier_path) -> Dict[str, str]:
    """Which GEMMs the loaded tier's kernels run for each dtype, and why (csrc/cpu/kernel_report.cpp). Asked
    on the first build_info(), not at import: the report reads the CUSTOMLAYERS_CPU_BLAS16/32 settings and
    asks the OS for the AMX tiles where the CPU has them, as the first kernel using them would."""
    try:
        report = ctypes.CDLL(tier_path).customlayers_cpu_gemm_report
    except (OSError, AttributeError) as e:
        return {"error": f"{tier_path} reports no GEMMs: {e}"}
    report.restype = ctypes.c_char_p
    return dict(line.split("=", 1) for line in report().decode(errors="replace").split("\n") if "=" in line)


def _registered_elsewhere() -> bool:
    """Whether the ops were registered before this import: a libcustomlayers (the CMake build, a C++
    program embedding Python) loaded with torch.ops.load_library. Then those kernels serve."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::centered", "")
    except RuntimeError:
        return False
    return True


def _load() -> None:
    global _loaded, _reason
    forced = _forced_devices()
    if _registered_elsewhere():
        _build.update(source="a customlayers library loaded before the package (torch.ops.load_library)")
        _read_cpu_tier(sorted(torch.ops.loaded_libraries))
    elif forced is not None and "library" in forced:
        _reason = "CUSTOMLAYERS_FORCE_FALLBACK is set"
    else:
        _reason = _load_library()
    if _reason is not None:
        _define_with_references()
        return
    _loaded = True
    for name in OPS:
        for device, key in DEVICES.items():
            _has_kernel[(name, device)] = torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key)
    for device in DEVICES:  # CUDA in a CPU-only build; the CPU when no tier of its kernels could be loaded
        missing = [name for name in OPS if not _has_kernel[(name, device)]]
        if not missing:
            continue
        if len(missing) < len(OPS):
            why = f"the op has no {device.upper()} kernel yet"
        elif device == "cuda":
            why = "built without CUDA kernels" if _build.get("cuda") is None else "not built"
        else:
            why = f"no CPU tier is loaded: {_build.get('cpu_tier_reason', 'not built')}"
        _process_contexts.enter_context(reference_kernels([device], why, missing))
    forced_devices = sorted((forced or set()) & set(DEVICES))
    if forced_devices:
        _process_contexts.enter_context(reference_kernels(forced_devices, "CUSTOMLAYERS_FORCE_FALLBACK names this device"))


_load()


def loaded() -> bool:
    """True when the compiled extension is loaded and used."""
    return _loaded


def reason() -> Optional[str]:
    """Why the compiled extension is not used, or None."""
    return _reason


def build_info() -> Dict[str, Optional[str]]:
    """torch and CUDA versions the loaded extension was built with (empty when none is loaded), the CPU tier
    loaded and the GEMMs its kernels run (cpu_gemms)."""
    if _tier_path is not None and "cpu_gemms" not in _build:
        _build.update(cpu_gemms=_read_cpu_gemms(_tier_path))
    return dict(_build)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether a compiled kernel of `op` serves `device_type` ('cpu', 'cuda'); else the reference does."""
    return _has_kernel.get((op, device_type), False)


def fallback_reason(op: str, device_type: str) -> Optional[str]:
    """Why the reference serves `op` on `device_type` (None when a compiled kernel does)."""
    return _fallback_why.get((op, device_type))


def op(name: str):
    """The op's default overload, e.g. op('centered') is torch.ops.customlayers.centered.default."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


# ------------------------------------------------------------------------------------ fake (meta) kernels
# Output metadata for torch.compile and torch.export, and the ops on meta tensors: each op's fake
# (customlayers._opdefs), registered when the compiled library is loaded (the references serve otherwise).
if _loaded:
    for _name, _d in OPDEFS.items():
        torch.library.register_fake(f"{NAMESPACE}::{_name}")(_d.fake)
