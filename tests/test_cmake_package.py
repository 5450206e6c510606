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
