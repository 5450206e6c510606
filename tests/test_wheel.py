"""The wheel, tested as installed: `pip wheel --no-build-isolation` builds it, `pip install --target` puts it
in a prefix of its own, and a smoke test runs from outside the source tree with only that prefix on the
path, so the installed package (not the checkout) is what runs: the compiled kernels, one op per layer
against the reference, and the environment report with the wheel's build record.

The wheel is built from this checkout in the environment the test runs in. Under `make test` (and CI) that
is the environment `make build` compiled the extension in, so the wheel's build reuses its objects (ninja
recompiles nothing, setuptools links again): the test then takes seconds, not a full compile."""
import os
import subprocess
import sys
import textwrap

import customlayers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = """
    import importlib.util, sys, torch, customlayers
    from customlayers import functional as F, reference as R
    assert customlayers.__file__.startswith(sys.argv[1]), customlayers.__file__
    assert importlib.util.find_spec("customlayers._C").origin.startswith(sys.argv[1])
    assert customlayers.backend() == "extension", customlayers.backend_report()
    build = customlayers.backend_report()["build"]  # a CPU tier came with the wheel and serves every op
    from customlayers import _build_info
    assert build["cpu_tier"] and tuple(build["cpu_tiers_built"]) == _build_info.CPU_TIERS, build
    assert all(devices["cpu"] == "kernel" for devices in customlayers.backend_report()["ops"].values())
    x, w, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(F.linear_act(x, w, b), R.linear_act(x, w, b))
    torch.testing.assert_close(F.linear_glu(x, w, w.flip(0), b, b), R.linear_glu(x, w, w.flip(0), b, b))
    torch.testing.assert_close(customlayers.nn.CenteredLayer()(x), R.centered(x))
    lin = customlayers.nn.LinearReLU(5, 3, dtype=torch.float64)
    torch.testing.assert_close(lin(x), torch.relu(torch.nn.functional.linear(x, lin.weight, lin.bias)))
    weight = torch.empty(64, 64)
    customlayers.init.masked_uniform_(weight, seed=3)
    assert ((weight == 0) | ((weight.abs() >= 5) & (weight.abs() <= 10))).all() and weight.count_nonzero() > 0
    torch.testing.assert_close(customlayers.init.masked_uniform_(torch.empty(64, 64), seed=3), weight, rtol=0, atol=0)
    from customlayers import info  # the environment report, with the wheel's build record
    report = info.report()
    assert f"built for torch: {torch.__version__}" in report, report
    record = {k: v for k, v in vars(_build_info).items() if k.isupper()}
    assert record == eval(sys.argv[2]), (record, sys.argv[2])  # the checkout's build, as the wheel was built
    print("installed", customlayers.__version__, customlayers.__file__)
"""


def _run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


def test_installed_wheel_runs_the_kernels(tmp_path):
    env = dict(os.environ)
    env.pop("CUSTOMLAYERS_FORCE_FALLBACK", None)
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
          "-w", str(tmp_path / "dist"), ROOT], cwd=ROOT, env=env)
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
    from customlayers import _build_info
    record = {k: v for k, v in vars(_build_info).items() if k.isupper()}
    out = _run([sys.executable, "-c", textwrap.dedent(SMOKE), str(prefix), repr(record)], cwd=work, env=smoke_env)
    assert out.startswith("installed"), out
