"""The CMake-built library (libtorch users' build, `make cpp-build`) loads into Python with
torch.ops.load_library and provides the same differentiable ops as the package's own extension."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `make test` sets CUSTOMLAYERS_CMAKE_LIBRARY after building it, and then the library must be there.
REQUIRED = os.environ.get("CUSTOMLAYERS_CMAKE_LIBRARY")
LIBRARY = REQUIRED or os.path.join(ROOT, "build", "cmake", "libcustomlayers.so")


@pytest.fixture
def cmake_library():
    if not os.path.exists(LIBRARY):
        assert not REQUIRED, f"CUSTOMLAYERS_CMAKE_LIBRARY={REQUIRED} does not exist"
        pytest.skip(f"the CMake library is not built ({LIBRARY}): run `make cpp-build`")
    return LIBRARY


def test_load_cmake_library_from_python(cmake_library):
    # Loaded before the package: the package then uses those ops instead of registering its own (one
    # process can register the customlayers library once).
    import customlayers
    own = customlayers.backend_report()["build"]  # the package's own extension, when it is in use
    best_tier = own.get("cpu_tier", "")
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({cmake_library!r})
        import customlayers
        assert customlayers.backend() == "extension", customlayers.backend_report()
        build = customlayers.backend_report()["build"]
        assert "loaded before the package" in build["source"]
        # CMake builds the same CPU tiers beside the library, which loads the one this CPU runs.
        assert build["cpu_tier"] in build["cpu_tiers_built"], build
        assert build["cpu_tier"] == ({best_tier!r} or build["cpu_tier"]), build
        op = torch.ops.customlayers.centered
        print(op(torch.tensor([1.0, 2, 3, 4, 5]), None).tolist())
        x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
        y = op(x, [1])
        torch.testing.assert_close(y, customlayers.reference.centered(x, [1]), rtol=0, atol=1e-12)
        assert torch.autograd.gradcheck(lambda t: op(t, [0]), (x,))
        assert torch.autograd.gradgradcheck(lambda t: op(t, None), (x,))
        for bad, exc in (((torch.arange(3), None), TypeError), ((x, [2]), IndexError), ((x, [0, 0]), RuntimeError)):
            try:
                op(*bad)
            except exc as e:
                print(type(e).__name__, str(e).splitlines()[0])
            else:
                raise AssertionError(f"no {{exc.__name__}}")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "[-2.0, -1.0, 0.0, 1.0, 2.0]"
    assert lines[1].startswith("TypeError centered: expected x to be a floating-point tensor")
    assert lines[2].startswith("IndexError centered: dim 2 is out of range")
    assert lines[3].startswith("RuntimeError centered: dim 0 appears more than once")


def test_cmake_library_then_package_with_force_fallback(cmake_library):
    """CUSTOMLAYERS_FORCE_FALLBACK=1 cannot drop ops a loaded library registered: the package uses them."""
    code = f"import torch; torch.ops.load_library({cmake_library!r}); import customlayers; print(customlayers.backend())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT, CUSTOMLAYERS_FORCE_FALLBACK="1"),
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "extension"
