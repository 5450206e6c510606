import os

import pytest
import torch

import customlayers

CUDA_SKIP = "no CUDA device on this machine: the CUDA kernels are only compiled here, not run"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP)),
]

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Hypothesis profiles (tests/test_properties.py): `ci`, the default, draws the same examples every run
# (derandomize) and few enough of them for make test (~30 s for the file on 2 busy cores); `long`
# (HYPOTHESIS_PROFILE=long, make test-long) draws 10x as many, fresh each run (a failure prints the blob
# that replays it). No deadline and no too_slow health check: first calls load and warm up, and a busy
# machine must not fail a run. No example database written into the checkout.
try:
    from hypothesis import HealthCheck, settings as _hypothesis_settings
except ImportError:
    pass
else:
    _HYPOTHESIS_COMMON = dict(deadline=None, database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    _hypothesis_settings.register_profile("ci", max_examples=50, derandomize=True, **_HYPOTHESIS_COMMON)
    _hypothesis_settings.register_profile("long", max_examples=500, **_HYPOTHESIS_COMMON)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_sessionstart(session):
    """make test-tiers sets CUSTOMLAYERS_EXPECT_CPU_TIER with ATEN_CPU_CAPABILITY: the run must be on that tier."""
    expected = os.environ.get("CUSTOMLAYERS_EXPECT_CPU_TIER")
    tier = customlayers.backend_report()["build"].get("cpu_tier")
    if expected and tier != expected:
        raise pytest.UsageError(f"CUSTOMLAYERS_EXPECT_CPU_TIER={expected} but the {tier or 'no'} tier is loaded: "
                                f"{customlayers.backend_report()['build']}")


def pytest_report_header(config):
    report = customlayers.backend_report()
    build = report["build"]
    tier = f"CPU tier {build.get('cpu_tier') or 'none'} ({build.get('cpu_tier_reason', 'no compiled library')})"
    return [f"customlayers backend: {report['backend']} (reason: {report['reason']}), build: {build}, {tier}",
            f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
            f"threads: {torch.get_num_threads()}"]


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only under CUSTOMLAYERS_RUN_SLOW=1 (make test-long)."""
    if os.environ.get("CUSTOMLAYERS_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run by make test-long (CUSTOMLAYERS_RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_file(name: str, *path: str):
    """A file of the repository (path relative to its root) loaded as module `name`, standalone: as
    setup.py loads customlayers/_cpu.py, or a script of examples/."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requires_extension():
    """Tests of the compiled kernels themselves skip (with the reason) when the run uses the fallback."""
    return pytest.mark.skipif(not customlayers._ops.loaded(),
                              reason=f"compiled extension not in use: {customlayers._ops.reason()}")


@pytest.fixture
def cpu_fallback():
    """The pure-PyTorch references registered as the ops' CPU kernels for one test, as where no compiled CPU
    kernel exists (CUSTOMLAYERS_FORCE_FALLBACK=cpu does it for a process); quiet."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with customlayers._ops.reference_kernels(["cpu"], "the test's cpu_fallback fixture"):
            yield


def strict_extension() -> bool:
    """CI sets CUSTOMLAYERS_EXPECT_EXTENSION=1: then a missing extension is a failure, not a skip."""
    return os.environ.get("CUSTOMLAYERS_EXPECT_EXTENSION") == "1"


def assert_compiled_matches_eager(model, x):
    """torch.compile(model, fullgraph=True) gives eager's outputs and parameter gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


# The ways of running 16-bit CPU GEMMs that CUSTOMLAYERS_CPU_BLAS16 forces (csrc/cpu/linear_act_widen.h).
BLAS16_MODES = ["native", "float", "dot", "amx"]
# The float32 GEMMs that CUSTOMLAYERS_CPU_BLAS32 forces on the BLAS path (csrc/cpu/gemm_f32.h): BLAS's, ours.
BLAS32_MODES = ["native", "own"]


def _run_checks(module: str, checks: str, env: dict) -> None:
    """`checks` (Python statements, module imported as t) in a subprocess with the variables of env added
    (the kernels read them once per process): skips when a check raises ValueError saying that a forced
    mode "needs a CPU with" what this one lacks, fails with the output otherwise."""
    import subprocess
    import sys
    code = (f"import conftest, {module} as t\n"  # conftest first: it may load a library
            f"try:\n    {checks}\n"
            "except ValueError as e:\n    if 'needs a CPU with' not in str(e): raise\n    print(e); raise SystemExit(3)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)})
    forced = " ".join(f"{k}={v}" for k, v in env.items())
    if out.returncode == 3:
        pytest.skip(f"{forced}: {out.stdout.strip()}")
    assert out.returncode == 0, forced + "\n" + out.stdout[-2000:] + out.stderr[-4000:]


def run_16bit_checks(module: str, blas16: str) -> None:
    """module's check_bf16_views_and_specials() then check_accuracy_like_native() with
    CUSTOMLAYERS_CPU_BLAS16=blas16: skips where 'dot' or 'amx' is refused on this CPU or tier (saying why)."""
    _run_checks(module, "t.check_bf16_views_and_specials(); t.check_accuracy_like_native()",
                {"CUSTOMLAYERS_CPU_BLAS16": blas16})


def run_float32_checks(module: str, blas32: str) -> None:
    """module's check_float32_like_native() with CUSTOMLAYERS_CPU_BLAS32=blas32, and its 16-bit accuracy check
    with those GEMMs run in float32 (CUSTOMLAYERS_CPU_BLAS16=float) on the same float32 GEMMs; then, that
    the forced GEMM is the one the tier reports running (backend_report's cpu_gemms)."""
    ran = {"native": "BLAS", "own": "gemm_f32"}[blas32]
    _run_checks(module, "t.check_float32_like_native(); t.check_accuracy_like_native(); "
                "import customlayers; g = customlayers.backend_report()['build']['cpu_gemms']['float32']; "
                f"assert g.startswith({ran!r}), g",
                {"CUSTOMLAYERS_CPU_BLAS32": blas32, "CUSTOMLAYERS_CPU_BLAS16": "float"})
