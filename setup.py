"""Build script for customlayers.

CUDA kernels are compiled when nvcc is found and torch is a CUDA build (or ``FORCE_CUDA=1``);
``CUSTOMLAYERS_CPU_ONLY=1`` forces a CPU-only build. ``TORCH_CUDA_ARCH_LIST`` is honoured; without it
and without a visible GPU the default is a short, sensible list instead of every architecture.
Use ``pip install --no-build-isolation .`` so the extension is built against the torch you already have.
"""
import glob
import importlib.util
import os
import platform
import re
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_module(name, filename):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "customlayers", filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Before torch is imported: a missing torch, ninja or bdist_wheel (pip install --no-build-isolation with an
# old setuptools and no wheel) stops here with the pip command that installs them.
_build_check = _load_module("_customlayers_build_check", "_build_check.py")
_build_check.check_prerequisites()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

# pip's isolated build (pip install . without --no-build-isolation) compiles against the torch it fetched:
# refused when the target environment has another one, which the extension could not load with.
_build_check.check_target_torch(torch.__version__, torch.__file__)
# Default targets when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: Ampere, Ada, Hopper, plus
# PTX for the newest so later GPUs can JIT it.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """A CUDA toolkit (bin/nvcc and include/cuda_runtime.h): $CUDA_HOME, $CUDA_PATH, the toolkit matching
    torch.version.cuda under /usr/local, /usr/local/cuda, then whatever torch found."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  f"/usr/local/cuda-{torch.version.cuda}" if torch.version.cuda else None,
                  "/usr/local/cuda", cpp_extension.CUDA_HOME]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) \
                and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.realpath(home)
    return None


def _nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _pip_nvidia_dirs(kind):
    """Header (kind='include') or library (kind='lib') dirs of pip-installed CUDA packages
    (site-packages/nvidia/cu13/include, nvidia/cublas/include, ...)."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                 os.path.dirname(os.path.dirname(torch.__file__))}:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", kind))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _want_cuda():
    """(True, cuda_home) to build the CUDA kernels, else (False, reason). FORCE_CUDA=1 turns a reason
    into an error, so a build that must have CUDA (CI) cannot quietly become CPU-only."""
    if _env_flag("CUSTOMLAYERS_CPU_ONLY"):
        return False, "CUSTOMLAYERS_CPU_ONLY=1"
    cuda_home = _find_cuda_home() if torch.version.cuda else None
    if cuda_home:
        return True, cuda_home
    reason = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)"
    if _env_flag("FORCE_CUDA"):
        raise RuntimeError(f"customlayers: FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, reason


_cpu = _load_module("_customlayers_cpu", "_cpu.py")


def _cpu_isa():
    """'avx2' when building on an x86-64 CPU with AVX2/FMA/F16C as CPUID reports them through torch
    (customlayers/_cpu.py; the CPU kernels then use at::vec's AVX2 vectors, and import checks the running
    CPU the same way), else 'default'.
    CUSTOMLAYERS_CPU_ISA=default|avx2 overrides."""
    isa = os.environ.get("CUSTOMLAYERS_CPU_ISA", "").strip().lower()
    if isa in ("default", "avx2"):
        return isa
    if isa:
        raise RuntimeError(f"customlayers: CUSTOMLAYERS_CPU_ISA must be 'default' or 'avx2', got {isa!r}")
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "avx2" if is_x86 and _cpu.has_avx2() and sys.platform != "win32" else "default"


def _sources(with_cuda):
    srcs = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "common", "*.cpp"))
                  + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if with_cuda:
        srcs += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return srcs


def _build_info_text(cuda_version, cpu_isa, cuda_arch_list=None):
    """Recorded so that import can refuse a build made for another torch, CUDA or CPU, and so that
    `python -m customlayers.info` can say what was built."""
    return (
        "# Generated by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {cuda_version!r}\n"
        f"CUDA_ARCH_LIST = {cuda_arch_list!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"CPU_ISA = {cpu_isa!r}\n"
        f"CPU_ISA_FLAGS = {_cpu.AVX2_FLAGS if cpu_isa == 'avx2' else ()!r}\n"
    )


def _run_ninja_build(build_directory, verbose, error_prefix):
    """torch.utils.cpp_extension's ninja run, printing one short line per compiled file (_build_check.run_ninja)."""
    _build_check.run_ninja(build_directory, cpp_extension._get_num_workers(verbose), error_prefix, ROOT)


cpp_extension._run_ninja_build = _run_ninja_build


class BuildExtension(cpp_extension.BuildExtension):
    """Writes the build record (customlayers/_build_info.py) beside the library it describes, once that
    library is built: in the source tree for --inplace and editable builds, in build_lib for a wheel. Other
    commands (sdist, egg_info, ...) leave the checkout's record alone, so it never describes a library
    that was not built."""
    build_info = ""

    def run(self):
        super().run()
        dirs = {os.path.join(self.build_lib, "customlayers")}
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.add(os.path.join(ROOT, "customlayers"))
        for folder in dirs:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "_build_info.py")
            if not os.path.exists(path) or open(path).read() != self.build_info:
                with open(path, "w") as f:
                    f.write(self.build_info)


def _extension():
    with_cuda, detail = _want_cuda()
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fvisibility=hidden"] if sys.platform != "win32" else ["/O2"]
    # at::parallel_for is an OpenMP region inlined from torch's headers: compiled without OpenMP, the
    # CPU kernels would run on one thread. (torch's bundled libgomp.so.1 then serves both.)
    link_args = []
    if torch._C.has_openmp and sys.platform != "win32":
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
    cpu_isa = _cpu_isa()
    if cpu_isa == "avx2":
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    define_macros = [("CUSTOMLAYERS_BUILDING_LIBRARY", None)]  # exports the public C++ API (customlayers.h)
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if not with_cuda:
        print(f"customlayers: building CPU kernels only ({detail}); CPU ISA {cpu_isa}; "
              f"{len(_sources(False))} C++ files (about 6-7 minutes on 2 cores)")
        BuildExtension.build_info = _build_info_text(None, cpu_isa)
        return cpp_extension.CppExtension(
            "customlayers._C", _sources(False), include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args, define_macros=define_macros)

    cuda_home = detail
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch may have settled on a wrapper script's directory
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    nvcc_version = _nvcc_version(cuda_home)
    print(f"customlayers: building CPU + CUDA kernels (nvcc {nvcc_version} at {cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')}); CPU ISA {cpu_isa}; "
          f"{len(_sources(False))} C++ and {len(_sources(True)) - len(_sources(False))} CUDA files "
          "(about 15 minutes on 2 cores)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(sorted(
        {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    BuildExtension.build_info = _build_info_text(nvcc_version, cpu_isa, arch_list)
    include_dirs += _pip_nvidia_dirs("include")
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "customlayers._C", _sources(True), include_dirs=include_dirs,
        library_dirs=_pip_nvidia_dirs("lib"), extra_link_args=link_args,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        define_macros=define_macros)


setup(
    packages=find_packages(include=["customlayers", "customlayers.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
