"""The CPU kernels' tiers and build configuration, shared by setup.py (which sources, which tiers and their
flags to build), the package (the tier report) and the tests (which cross-compile the sources for aarch64).
Standalone: setup.py loads this file without importing the package.

The library is built in two parts. The core (op schemas, autograd, autocast, checks, the CUDA kernels) is
compiled with no ISA flag, so it loads on any CPU. The CPU kernels (csrc/cpu/) are compiled once per tier,
each into its own library (libcustomlayers_cpu_<tier>.so, beside the core), with that tier's flags and
ATen's CPU_CAPABILITY macros (at::vec then uses that tier's vector width). When the core is loaded it
loads exactly one tier (csrc/cpu_tier.cpp): the highest that is built, that CPUID says this CPU runs,
and that does not exceed torch's CPU capability (torch.backends.cpu.get_cpu_capability(), which
ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers). /proc/cpuinfo is read for reports only."""
from __future__ import annotations

import glob
import os
import platform
import sys


def _read_tiers() -> dict:
    """cpu_tiers.txt (beside this file, shared with CMakeLists.txt): tier name -> its compiler flags."""
    tiers = {}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_tiers.txt")) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if words:
                tiers[words[0]] = tuple(words[1:])
    return tiers


TIER_FLAGS = _read_tiers()
TIERS = tuple(TIER_FLAGS)  # lowest first


def tier_library(tier: str) -> str:
    """The file name of a tier's library (the same in setup.py's and CMake's builds)."""
    return f"libcustomlayers_cpu_{tier}.so"


def build_tiers(machine: str = "") -> tuple:
    """The tiers to build on `machine` (platform.machine(); default: this one): every tier on x86-64 (Linux
    and macOS: GCC/Clang flags), 'default' alone elsewhere (aarch64 among others: no x86 flag there).
    CUSTOMLAYERS_CPU_TIERS (a comma-separated list, e.g. 'default' for a quicker build) narrows it; it must
    name 'default', which every CPU runs."""
    is_x86 = (machine or platform.machine()).lower() in ("x86_64", "amd64")
    available = TIERS if is_x86 and sys.platform != "win32" else ("default",)
    value = os.environ.get("CUSTOMLAYERS_CPU_TIERS", "").strip().lower()
    if not value:
        return available
    wanted = {t.strip() for t in value.split(",") if t.strip()}
    if not wanted <= set(available) or "default" not in wanted:
        raise RuntimeError(f"customlayers: CUSTOMLAYERS_CPU_TIERS must list 'default' and any of "
                           f"{', '.join(available[1:]) or 'no other tier on this machine'}, got {value!r}")
    return tuple(t for t in available if t in wanted)


def cpuinfo() -> dict:
    """The first processor's fields in /proc/cpuinfo ('model name', 'cpu family', 'flags', ...; empty where
    there is none). For reports only: CPUID (csrc/cpu_tier.cpp) decides."""
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


def _sources(root: str, *folders: str) -> list:
    return sorted(s for folder in folders for s in glob.glob(os.path.join(root, "csrc", *folder.split("/"), "*.cpp")))


def core_sources(root: str = "") -> list:
    """The core library's C++ sources under root (default: relative to the current directory, as setup.py
    names them), sorted; CMakeLists.txt globs the same folders."""
    return _sources(root, "", "common")


def tier_sources(root: str = "") -> list:
    """The C++ sources of each tier's library: the CPU kernels and what they share with the other devices."""
    return _sources(root, "cpu", "common")
