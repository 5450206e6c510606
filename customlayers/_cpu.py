"""CPU feature detection, shared by setup.py (which CPU ISA to build for) and _ops.py (whether this CPU
can run the build). Standalone: setup.py loads this file without importing the package.

One source decides: CPUID, as torch reads it (torch.cpu.get_capabilities, from the cpuinfo library),
i.e. what the instructions can actually run. /proc/cpuinfo is not consulted for any decision: it can
disagree with CPUID (qemu-user emulating a CPU without AVX2 shows the host's flags there), and loading
an AVX2 build on such a CPU dies of SIGILL. torch's ATEN_CPU_CAPABILITY does not change the answer: it
lowers the kernels torch dispatches to, not what the CPU can run."""
from __future__ import annotations

# The x86-64 features an AVX2 build of the CPU kernels uses, named as the build record lists them.
AVX2_FLAGS = ("avx2", "fma", "f16c")
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


def cpu_flags() -> set:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none). For reports
    only: has_avx2 (CPUID) decides."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
