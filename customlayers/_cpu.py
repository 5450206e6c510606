"""CPU feature detection, shared by setup.py (which CPU ISA to build for) and _ops.py (whether this CPU
can run the build). Standalone: setup.py loads this file without importing the package."""
from __future__ import annotations

# The x86-64 features an AVX2 build of the CPU kernels uses.
AVX2_FLAGS = ("avx2", "fma", "f16c")


def cpu_flags() -> set:
    """The running CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_avx2() -> bool:
    import torch
    return set(AVX2_FLAGS) <= cpu_flags() or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
