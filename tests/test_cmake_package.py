"""The CMake build configures with the line from PyTorch's C++ docs,
`cmake -S . -B build -DCMAKE_PREFIX_PATH=$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')`,
and nothing else, even where the first python3 on PATH has no torch. (ctest installs the package and builds
a find_package(customlayers) project against it: tests/cpp/package_consumer.)"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE = shutil.which("cmake", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))


@pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")
def test_configure_with_torch_cmake_prefix_path(tmp_path):
    # PATH without this interpreter's directory: a python3 found there (if any) is not the one with torch.
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and os.path.realpath(d) != os.path.realpath(os.path.dirname(sys.executable)))
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(CMAKE), path])}
    env.pop("Torch_DIR", None)
    out = subprocess.run([CMAKE, "-S", ROOT, "-B", str(tmp_path / "build"),
                          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    torch_dir = os.path.join(torch.utils.cmake_prefix_path, "Torch")
    assert f"torch {torch_dir}" in out.stdout


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(os.path.join(home, "bin", "nvcc"))
    return shutil.which("nvcc")


NVCC = _nvcc() if torch.version.cuda else None


@pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")
@pytest.mark.skipif(NVCC is None, reason="no CUDA build of torch with an nvcc: the CMake build is CPU-only")
def test_default_gpu_architectures_are_supported_by_nvcc(tmp_path):
    """Configured with its defaults (CUDA AUTO, no TORCH_CUDA_ARCH_LIST), the CMake build compiles for
    architectures the toolkit's nvcc supports (torch's own list has some a newer nvcc dropped: sm_50), and an
    unsupported one given by hand fails at configure time, naming the supported ones."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDAARCHS")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    listed = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    args = [CMAKE, "-S", ROOT, "-B", str(tmp_path / "build"), f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCUSTOMLAYERS_BUILD_TESTS=OFF", "-DCUSTOMLAYERS_BUILD_EXAMPLES=OFF"]
    for run in (1, 2):  # a reconfigure keeps the choice (CMake's cached CMAKE_CUDA_ARCHITECTURES is not a user's)
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "customlayers: GPU architectures " in out.stdout and "(default)" in out.stdout, out.stdout[-3000:]
    chosen = [line.split("=", 1)[1] for line in open(tmp_path / "build" / "CMakeCache.txt")
              if line.startswith("CUSTOMLAYERS_CUDA_ARCH_LIST:")][0].split(";")
    assert chosen and chosen != [""]
    for arch in chosen:
        major, minor = arch.split("+")[0].split(".")
        assert f"compute_{major}{minor}" in listed, (arch, listed)
    gencode = open(tmp_path / "build" / "build.ninja").read() if os.path.exists(tmp_path / "build" / "build.ninja") \
        else ""
    assert "compute_50" not in gencode

    bad = subprocess.run(args[:3] + [str(tmp_path / "bad")] + args[4:], env={**env, "TORCH_CUDA_ARCH_LIST": "5.0"},
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0
    assert "GPU architecture 5.0" in bad.stderr and "compute_80" in bad.stderr, bad.stderr[-3000:]
