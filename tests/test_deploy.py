"""Deployment with AOTInductor: a customlayers.convert()ed MLP compiled by aoti_compile_and_package runs
from Python (aoti_load_package) and from C++ (examples/cpp/aoti_mlp, linked with the CMake library), and
gives the eager result. A package or a saved torch.export program loads only where the ops are registered;
the tests pin what torch says elsewhere (docs/deploy.md quotes it) and that import customlayers fixes it
(the C++ run shows that linking the library does).
The package is compiled once for the module (40 s to 2 min on 2 busy cores)."""
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

import customlayers
from conftest import requires_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `make test` builds the CMake library and examples first and sets CUSTOMLAYERS_CMAKE_LIBRARY: then the C++
# program must be there.
REQUIRED = os.environ.get("CUSTOMLAYERS_CMAKE_LIBRARY")
LIBRARY = REQUIRED or os.path.join(ROOT, "build", "cmake", "libcustomlayers.so")
AOTI_EXAMPLE = os.path.join(os.path.dirname(LIBRARY), "examples", "cpp", "aoti_mlp")
IN_FEATURES = 8

# With the fallback the ops are composites of aten ops, which AOTInductor lowers: the package would not call them.
pytestmark = requires_extension()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The eager model, its AOTInductor package and its saved torch.export program."""
    torch.manual_seed(0)
    model = customlayers.convert(nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                               nn.Linear(16, 4))).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.randn(3, IN_FEATURES),), dynamic_shapes=({0: batch},))
    assert "torch.ops.customlayers.linear_act" in ep.graph_module.code
    tmp = tmp_path_factory.mktemp("deploy")
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / "mlp.pt2"))
    program = str(tmp / "mlp_program.pt2")
    torch.export.save(ep, program)
    return types.SimpleNamespace(model=model, package=package, program=program)


def _linspace_input(batch):
    """The input examples/cpp/aoti_mlp feeds."""
    return torch.linspace(-1, 1, batch * IN_FEATURES).reshape(batch, IN_FEATURES)


def test_aoti_package_runs_from_python(deployed):
    compiled = torch._inductor.aoti_load_package(deployed.package)
    for batch in (1, 5):
        x = torch.randn(batch, IN_FEATURES)
        torch.testing.assert_close(compiled(x), deployed.model(x).detach())


def test_aoti_package_runs_from_cpp(deployed):
    if not os.path.exists(AOTI_EXAMPLE):
        assert not REQUIRED, f"{AOTI_EXAMPLE} is not built (CUSTOMLAYERS_CMAKE_LIBRARY={REQUIRED} is set)"
        pytest.skip(f"the C++ example is not built ({AOTI_EXAMPLE}): run `make cpp-build`")
    out = subprocess.run([AOTI_EXAMPLE, deployed.package, "5", str(IN_FEATURES)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    y = torch.tensor([[float(v) for v in line.split()] for line in out.stdout.splitlines()])
    torch.testing.assert_close(y, deployed.model(_linspace_input(5)).detach())


def test_loading_where_the_ops_are_missing_then_import_customlayers(deployed):
    """In a fresh interpreter without customlayers, torch refuses both files, naming the op (AOTInductor) or,
    in a warning, the op and 'import the custom op' (torch.export.load); docs/deploy.md quotes these. After
    `import customlayers` the same process loads both and gives the eager result."""
    expected = deployed.model(_linspace_input(3)).detach().tolist()
    code = textwrap.dedent(f"""
        import torch
        x = torch.linspace(-1, 1, 3 * {IN_FEATURES}).reshape(3, {IN_FEATURES})
        loads = {{"aoti": lambda: torch._inductor.aoti_load_package({deployed.package!r}),
                 "export": lambda: torch.export.load({deployed.program!r}).module()}}
        def load_and_run():
            for name, load in loads.items():
                try:
                    y = load()(x)
                except Exception as e:
                    print(name, type(e).__name__, str(e).strip().splitlines()[-1])
                else:
                    torch.testing.assert_close(y, torch.tensor({expected!r}))
                    print(name, "ok")
        load_and_run()
        import customlayers
        load_and_run()
    """)
    env = {k: v for k, v in os.environ.items() if k != "CUSTOMLAYERS_FORCE_FALLBACK"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "aoti RuntimeError Could not find schema for customlayers::linear_act.", lines
    assert lines[1].startswith("export RuntimeError We ran into an error when deserializing"), lines
    assert "failed to resolve torch.ops.customlayers.linear_act.default" in out.stderr
    assert "Please import the custom op" in out.stderr
    assert lines[2:] == ["aoti ok", "export ok"]
