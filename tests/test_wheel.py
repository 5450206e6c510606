"""The wheel, tested as installed: `pip wheel --no-build-isolation` builds it, `pip install --target` puts it
in a prefix of its own, and a smoke test runs from outside the source tree with only that prefix on the
path, so the installed package (not the checkout) is what runs: the compiled kernels, one op per layer
against the reference, and the environment report with the wheel's build record.

The wheel is built CPU-only from a copy of the sources kept in build/wheel-test/ (git-ignored), whose build
directory persists: a checkout compiles the kernels once, later runs recompile only what changed."""
import os
import shutil
import subprocess
import sys
import textwrap

import customlayers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the wheel is built from: the files an sdist carries (MANIFEST.in) and the package's Python sources.
SOURCES = ["csrc", "cmake", "customlayers", "CMakeLists.txt", "MANIFEST.in", "Makefile", "README.md",
           "pyproject.toml", "setup.py"]
NOT_SOURCES = shutil.ignore_patterns("*.so", "_build_info.py", "__pycache__")

SMOKE = """
    import importlib.util, sys, torch, customlayers
    from customlayers import functional as F, reference as R
    assert customlayers.__file__.startswith(sys.argv[1]), customlayers.__file__
    assert importlib.util.find_spec("customlayers._C").origin.startswith(sys.argv[1])
    assert customlayers.backend() == "extension", customlayers.backend_report()
    x, w, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(F.linear_act(x, w, b), R.linear_act(x, w, b))
    torch.testing.assert_close(customlayers.nn.CenteredLayer()(x), R.centered(x))
    lin = customlayers.nn.LinearReLU(5, 3, dtype=torch.float64)
    torch.testing.assert_close(lin(x), torch.relu(torch.nn.functional.linear(x, lin.weight, lin.bias)))
    weight = torch.empty(64, 64)
    customlayers.init.masked_uniform_(weight, seed=3)
    assert ((weight == 0) | ((weight.abs() >= 5) & (weight.abs() <= 10))).all() and weight.count_nonzero() > 0
    torch.testing.assert_close(customlayers.init.masked_uniform_(torch.empty(64, 64), seed=3), weight, rtol=0, atol=0)
    from customlayers import info  # the environment report, with the wheel's build record
    report = info.report()
    assert "built with CUDA: none (CPU-only build)" in report and f"built for torch: {torch.__version__}" in report, report
    print("installed", customlayers.__version__, customlayers.__file__)
"""


def _run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


def _source_copy() -> str:
    """build/wheel-test/src: a fresh copy of the sources (timestamps kept, so ninja reuses what it built
    there before), beside the build directory of earlier runs."""
    src = os.path.join(ROOT, "build", "wheel-test", "src")
    os.makedirs(src, exist_ok=True)
    for name in os.listdir(src):
        if name != "build":
            path = os.path.join(src, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name), ignore=NOT_SOURCES)
        else:
            shutil.copy2(path, src)
    return src


def test_installed_wheel_runs_the_kernels(tmp_path):
    src = _source_copy()
    env = {**os.environ, "CUSTOMLAYERS_CPU_ONLY": "1"}
    env.pop("CUSTOMLAYERS_FORCE_FALLBACK", None)
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
          "-w", str(tmp_path / "dist"), src], cwd=src, env=env)
    (wheel,) = (tmp_path / "dist").glob("customlayers-*.whl")
    assert wheel.name.startswith(f"customlayers-{customlayers.__version__}-"), wheel.name
    prefix = tmp_path / "prefix"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(prefix),
          str(wheel)], env=env)
    # Only the prefix on the path (torch comes from the interpreter's site-packages); cwd outside the checkout.
    smoke_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    smoke_env["PYTHONPATH"] = str(prefix)
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = _run([sys.executable, "-c", textwrap.dedent(SMOKE), str(prefix)], cwd=work, env=smoke_env)
    assert out.startswith("installed"), out
