"""The CPU kernels' tiers (customlayers/_cpu.py, csrc/cpu_tier.cpp): one library of them per tier, and the
core loads the highest that is built, that this CPU runs and that torch's CPU capability allows
(ATEN_CPU_CAPABILITY lowers it). `make test` runs the kernel tests again under every lower tier this
machine runs (make test-tiers); the tier logic itself on any CPU: tests/cpp/test_cpu_tier.cpp."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import customlayers
from conftest import requires_extension
from customlayers import _cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = requires_extension()

REPORT = ("import json, torch, customlayers; "
          "print(json.dumps({**customlayers.backend_report(), 'torch': torch.backends.cpu.get_cpu_capability()}))")


def run(code: str, pythonpath: str = ROOT, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "CUSTOMLAYERS_FORCE_FALLBACK")}
    full.update(PYTHONPATH=pythonpath, **env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                         cwd=pythonpath)  # python -c puts the working directory first on sys.path
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def report(**kw) -> dict:
    return json.loads(run(REPORT, **kw).splitlines()[-1])


@pytest.fixture(scope="module")
def best() -> dict:
    """The build info of a process left to choose (no ATEN_CPU_CAPABILITY), with torch's own CPU capability."""
    rep = report()
    return {**rep["build"], "torch_capability": rep["torch"]}


def runnable(best) -> list:
    """The tiers built that this CPU runs: every built tier up to the one a free choice loads."""
    built = list(best["cpu_tiers_built"])
    return built[:built.index(best["cpu_tier"]) + 1]


def test_the_best_tier_runs_and_the_record_lists_the_built_ones(best):
    assert best["cpu_tier"] in best["cpu_tiers_built"], best
    assert tuple(best["cpu_tiers_built"]) == tuple(customlayers._build_info.CPU_TIERS)
    # torch chooses its own kernels from CPUID the same way: with every tier built, ours is torch's.
    if best["cpu_tiers_built"] == list(_cpu.TIERS):
        assert best["cpu_tier"] == best["torch_capability"].lower(), best
    assert "CPUID" in best["cpu_tier_reason"]


def test_aten_cpu_capability_selects_each_lower_tier(best):
    for tier in runnable(best):
        build = report(ATEN_CPU_CAPABILITY=tier)["build"]
        assert build["cpu_tier"] == tier, build
        if tier != best["cpu_tier"]:
            assert f"allows {tier}" in build["cpu_tier_reason"], build


def test_info_names_the_tier_and_why(best):
    out = run("import customlayers.info as i; print(i.report())")
    line = next(l for l in out.splitlines() if l.startswith("CPU tier:"))
    assert best["cpu_tier"] in line and "CPUID" in line, line
    assert "built CPU tiers: " + ", ".join(best["cpu_tiers_built"]) in out


def _package_without(tmp_path, tiers) -> str:
    """A copy of the package whose folder lacks the libraries of `tiers`; returns its sys.path entry. The
    libraries are copied (torch.ops.load_library resolves symlinks), the rest linked."""
    import shutil
    pkg = tmp_path / "customlayers"
    pkg.mkdir()
    source = os.path.join(ROOT, "customlayers")
    for name in os.listdir(source):
        if name == "__pycache__" or name in {_cpu.tier_library(t) for t in tiers}:
            continue
        if name.endswith(".so"):
            shutil.copy(os.path.join(source, name), pkg / name)
        else:
            os.symlink(os.path.join(source, name), pkg / name)
    return str(tmp_path)


def test_a_tier_not_built_gives_way_to_the_next_one_down(best, tmp_path):
    if len(runnable(best)) < 2:
        pytest.skip(f"this CPU runs only the {best['cpu_tier']} tier")
    build = report(pythonpath=_package_without(tmp_path, [best["cpu_tier"]]))["build"]
    assert build["cpu_tier"] == runnable(best)[-2], build
    assert f"{best['cpu_tier']} was not built" in build["cpu_tier_reason"], build


def test_no_tier_built_leaves_the_cpu_to_the_references(tmp_path):
    out = run(REPORT + "\nimport torch; print(customlayers.functional.centered(torch.tensor([1.0, 3.0])).tolist())",
              pythonpath=_package_without(tmp_path, _cpu.TIERS))
    rep = json.loads(out.splitlines()[-2])
    assert rep["build"]["cpu_tier"] == "" and rep["build"]["cpu_tiers_built"] == []
    assert all(devices["cpu"] == "fallback" for devices in rep["ops"].values()), rep
    assert "no CPU tier is loaded" in rep["why"]["centered"]["cpu"]
    assert out.splitlines()[-1] == "[-1.0, 1.0]"


# Inputs from integer arithmetic and one correctly rounded division, so they are the same bits whatever
# vector width torch's own kernels use; each output's digest is printed.
BITS = """
    import hashlib, torch, customlayers
    def data(n, dtype):
        i = torch.arange(n, dtype=torch.int64)
        return (((i * 2654435761) % 1000003).double() / 1000003 * 6 - 2).to(dtype)
    def digest(t):
        return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for n in (1, 7, 31, 33, 1000, 4099, 1 << 17, (1 << 20) + 3):
            w = torch.empty(n, dtype=dtype)
            torch.ops.customlayers.masked_uniform_(w, seed=1234, offset=7)
            print("masked_uniform_", dtype, n, digest(w))
            print("centered", dtype, n, digest(customlayers.functional.centered(data(n, dtype))))
        w = torch.empty(70, 33, dtype=dtype).t()
        torch.ops.customlayers.masked_uniform_(w, seed=5)
        print("masked_uniform_ transposed", dtype, digest(w))
        for shape, dim in (((257, 129), [0]), ((257, 129), [1]), ((3, 70001), [1]), ((5, 3, 4099), [0, 2]),
                           ((300, 1000), [0, 1])):
            x = data(shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1), dtype).view(shape)
            print("centered", dtype, shape, dim, digest(customlayers.functional.centered(x, dim)))
            print("centered transposed", dtype, shape, dim, digest(customlayers.functional.centered(x.transpose(0, -1), dim)))
"""


def test_masked_uniform_and_centered_give_the_same_bits_on_every_tier(best):
    tiers = runnable(best)
    if len(tiers) < 2:
        pytest.skip(f"this CPU runs only the {best['cpu_tier']} tier")
    outputs = {tier: run(BITS, ATEN_CPU_CAPABILITY=tier).splitlines() for tier in tiers}
    for tier in tiers[1:]:
        differ = [a for a, b in zip(outputs[tiers[0]], outputs[tier]) if a != b]
        assert not differ and len(outputs[tier]) == len(outputs[tiers[0]]), (tier, differ[:5])
