"""What to paste into a bug report: ``python -m customlayers.info``.

Prints our version and location, the build record (the torch, CUDA and GPU architectures the compiled
extension was built for, or that it is CPU-only, and its CPU tiers), the running Python, torch, CUDA,
GPUs and CPU, which CPU tier runs and why, and for each op and device whether a compiled kernel or the
pure-PyTorch fallback runs, and why.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import List

import torch

import customlayers
from customlayers import _cpu, _ops


def _build_lines() -> List[str]:
    try:
        from customlayers import _build_info as b
    except ImportError:
        return ["build record:    none (the compiled extension is not built)"]
    arch = getattr(b, "CUDA_ARCH_LIST", None)
    cuda = "none (CPU-only build)" if b.CUDA_VERSION is None else \
        f"{b.CUDA_VERSION}, architectures {arch if arch else 'not recorded'}"
    return [f"built for torch: {b.TORCH_VERSION}",
            f"built with CUDA: {cuda}",
            f"built CPU tiers: {', '.join(getattr(b, 'CPU_TIERS', ())) or 'not recorded'}"]


def _running_lines() -> List[str]:
    lines = [f"python:          {platform.python_version()} ({sys.executable})",
             f"torch:           {torch.__version__} ({os.path.dirname(torch.__file__)})",
             f"torch CUDA:      {torch.version.cuda or 'none (CPU-only torch)'}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}:           {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("GPUs:            none visible")
    model = _cpu.cpuinfo().get("model name", "model not listed in /proc/cpuinfo")
    lines.append(f"CPU:             {platform.machine()}, {model}, torch CPU capability "
                 f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    build = _ops.build_info()
    if "cpu_tier" in build:
        lines.append(f"CPU tier:        {build['cpu_tier'] or 'none'} ({build['cpu_tier_reason']}; "
                     f"tiers beside the library: {', '.join(build['cpu_tiers_built']) or 'none'})")
    for dtype, how in build.get("cpu_gemms", {}).items():
        lines.append(f"CPU GEMMs:       {dtype}: {how}")
    return lines


def report() -> str:
    """The report `python -m customlayers.info` prints."""
    backend = customlayers.backend_report()
    lines = [f"customlayers:    {customlayers.__version__} ({os.path.dirname(customlayers.__file__)})",
             f"backend:         {backend['backend']}" + (f" ({backend['reason']})" if backend["reason"] else ""),
             *_build_lines(), *_running_lines(), "ops:"]
    for op, devices in backend["ops"].items():
        for device, kind in devices.items():
            why = _ops.fallback_reason(op, device)
            lines.append(f"  {op:<20} {device:<5} {kind}" + (f": {why}" if why else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
