"""CPU feature detection and the CPU kernels' build configuration, shared by setup.py (which sources, which
CPU ISA and its flags to build with), _ops.py (whether this CPU can run the build) and the tests (which
cross-compile the sources for aarch64). Standalone: setup.py loads this file without importing the package.

One source decides: CPUID, as torch reads it (torch.cpu.get_capabilities, from the cpuinfo library),
i.e. what the instructions can actually run. /proc/cpuinfo is not consulted for any decision: it can
disagree with CPUID (qemu-user emulating a CPU without AVX2 shows the host's flags there), and loading
an AVX2 build on such a CPU dies of SIGILL. torch's ATEN_CPU_CAPABILITY does not change the answer: it
lowers the kernels torch dispatches to, not what the CPU can run."""
from __future__ import annotations

import glob
import os
import platform
import sys

# The x86-64 features an AVX2 build of the CPU kernels uses, named as the build record lists them.
AVX2_FLAGS = ("avx2", "fma", "f16c")
# The compiler flags of each ISA the CPU kernels are built for: 'default' adds none (any x86-64, aarch64).
ISA_COMPILE_FLAGS = {"default": (), "avx2": ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2")}
# The same features as torch.cpu.get_capabilities() names them.
_CPUID_NAMES = {"avx2": "avx2", "fma": "fma3", "f16c": "f16c"}


def cpuid_features() -> dict:
    """{feature: present} for AVX2_FLAGS, as CPUID reports them through torch (all False where torch
    cannot say, e.g. a torch without torch.cpu.get_capabilities, or a CPU that is not x86-64)."""
    import torch
    try:
        avx2 = bool(torch.cpu._is_avx2_supported())
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return {flag: False for flag in AVX2_FLAGS}
    return {flag: avx2 if flag == "avx2" else bool(caps.get(_CPUID_NAMES[flag], False)) for flag in AVX2_FLAGS}


def has_avx2() -> bool:
    """Whether this CPU runs an AVX2 build: AVX2, FMA and F16C, as CPUID reports them (cpuid_features)."""
    return all(cpuid_features().values())


def cpuinfo() -> dict:
    """The first processor's fields in /proc/cpuinfo ('model name', 'cpu family', 'flags', ...; empty where
    there is none). For reports only: has_avx2 (CPUID) decides."""
    fields: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> set:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none). For reports
    only: has_avx2 (CPUID) decides."""
    return set(cpuinfo().get("flags", "").split())


def build_isa(machine: str = "") -> str:
    """The ISA to build the CPU kernels for on `machine` (platform.machine(); default: this one): 'avx2' on an
    x86-64 CPU that has AVX2/FMA/F16C as CPUID reports them (has_avx2; the kernels then use at::vec's AVX2
    vectors, and import checks the running CPU the same way), else 'default' (aarch64 among others: no x86
    flag there). CUSTOMLAYERS_CPU_ISA=default|avx2 overrides."""
    isa = os.environ.get("CUSTOMLAYERS_CPU_ISA", "").strip().lower()
    if isa in ISA_COMPILE_FLAGS:
        return isa
    if isa:
        raise RuntimeError(f"customlayers: CUSTOMLAYERS_CPU_ISA must be 'default' or 'avx2', got {isa!r}")
    is_x86 = (machine or platform.machine()).lower() in ("x86_64", "amd64")
    return "avx2" if is_x86 and sys.platform != "win32" and has_avx2() else "default"


def cpu_sources(root: str = "") -> list:
    """The C++ sources of the library (op schemas, checks, CPU kernels) under root (default: relative to the
    current directory, as setup.py names them), sorted; CMakeLists.txt globs the same folders."""
    return sorted(glob.glob(os.path.join(root, "csrc", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "common", "*.cpp"))
                  + glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
