"""Every Python code block of README.md and docs/*.md runs as written, each in a fresh interpreter from
the repository root."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
BLOCKS = [(os.path.relpath(path, ROOT), i, code) for path in DOCS
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", open(path).read(), re.S))]


@pytest.mark.parametrize("path,index,code", BLOCKS, ids=[f"{p}:{i}" for p, i, _ in BLOCKS])
def test_python_block_runs(path, index, code):
    if "build/cmake/libcustomlayers.so" in code and not os.path.exists(os.path.join(ROOT, "build", "cmake", "libcustomlayers.so")):
        assert not os.environ.get("CUSTOMLAYERS_CMAKE_LIBRARY"), "make test builds the CMake library first"
        pytest.skip("the CMake library is not built (make cpp-build)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, f"{path} block {index} failed:\n{out.stderr[-3000:]}"
