"""TorchScript: torch.jit.script and torch.jit.trace of every module and of the functional forms, the same
outputs and gradients as eager, torch.jit.save / torch.jit.load, and a fresh interpreter loading a saved
scripted model after ``import customlayers`` (which registers the ops)."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import customlayers
from customlayers._activations import NAMES as ACTIVATIONS
from customlayers import functional as F
from customlayers import nn as cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def _modules():
    lazy = cnn.LazyMyLinear(3)
    lazy(torch.randn(2, 4))  # materialized: a MyLinear
    return {
        "centered": cnn.CenteredLayer(),
        "centered_dim0": cnn.CenteredLayer(0),
        "centered_dims": cnn.CenteredLayer((0, 1)),
        "mylinear": cnn.MyLinear(4, 3),
        "mylinear_none_nobias": cnn.MyLinear(4, 3, bias=False, activation="none"),
        "lazy": lazy,
        "linear_relu": cnn.LinearReLU(4, 3),
        "fused_linear": cnn.FusedLinear(4, 3),
        "fused_linear_nobias": cnn.FusedLinear(4, 3, bias=False),
        "sequential": nn.Sequential(cnn.LinearReLU(4, 8), cnn.CenteredLayer(), cnn.MyLinear(8, 5), cnn.FusedLinear(5, 2)),
    }


MODULES = sorted(_modules())


def _grads(module, x, out):
    out.square().sum().backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    x.grad = None
    module.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("how", ["script", "trace"])
def test_module_matches_eager(name, how):
    module = _modules()[name]
    x = torch.randn(5, 4, requires_grad=True)
    jitted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, x.detach())
    expected = module(x)
    want = _grads(module, x, expected)
    got_out = jitted(x)
    torch.testing.assert_close(got_out, expected, rtol=0, atol=0)
    got = _grads(jitted, x, got_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # The parameters are the module's own (shared), with the same names.
    assert [n for n, _ in jitted.named_parameters()] == [n for n, _ in module.named_parameters()]


def test_scripted_graph_calls_the_ops():
    graph = str(torch.jit.script(_modules()["sequential"]).inlined_graph)
    assert graph.count("customlayers::linear_act") == 3 and graph.count("customlayers::centered") == 1


def test_functional_forms_script():
    centered, linear_act = torch.jit.script(F.centered), torch.jit.script(F.linear_act)
    x, w, b = torch.randn(3, 4), torch.randn(4, 5), torch.randn(5)
    for dim in (None, 0, [1], [0, 1]):
        torch.testing.assert_close(centered(x, dim), F.centered(x, dim), rtol=0, atol=0)
    for act in ACTIVATIONS:
        torch.testing.assert_close(linear_act(x, w, b, act), F.linear_act(x, w, b, act), rtol=0, atol=0)
        torch.testing.assert_close(linear_act(x, w.t().contiguous(), None, act, True),
                                   F.linear_act(x, w.t().contiguous(), None, act, weight_t=True), rtol=0, atol=0)
    # The ops' argument checks run under TorchScript too.
    with pytest.raises(RuntimeError, match="act"):
        linear_act(x, w, b, "swish")


def test_functional_forms_in_scripted_function_gradients():
    @torch.jit.script
    def mlp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.centered(F.linear_act(x, w, b), 0)

    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((3, 4), (4, 5), (5,)))
    got = torch.autograd.grad(mlp(x, w, b).square().sum(), (x, w, b))
    want = torch.autograd.grad(F.centered(F.linear_act(x, w, b), 0).square().sum(), (x, w, b))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_lazy_unmaterialized_script_error():
    with pytest.raises(RuntimeError, match="run a first input through it .* or use torch.jit.trace or torch.export"):
        torch.jit.script(cnn.LazyMyLinear(3))
    with pytest.raises(RuntimeError, match="run a first input through it"):
        torch.jit.script(nn.Sequential(cnn.LazyMyLinear(3)))


def test_converted_book_mlp_scripts():
    model = customlayers.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_save_load_fresh_interpreter(tmp_path, how):
    model = _modules()["sequential"].eval()
    x = torch.randn(5, 4)
    jitted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    path = str(tmp_path / "model.pt")
    torch.jit.save(jitted, path)
    torch.testing.assert_close(torch.jit.load(path)(x), model(x), rtol=0, atol=0)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = textwrap.dedent(f"""
        import warnings
        import torch
        warnings.simplefilter("ignore")
        try:
            torch.jit.load({path!r})
        except RuntimeError as e:
            print("without import:", "customlayers" in str(e))
        import customlayers
        model = torch.jit.load({path!r})
        x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        print("ok")
    """)
    env = dict(os.environ)  # the same backend (CUSTOMLAYERS_FORCE_FALLBACK) as this process
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["without import: True", "ok"], out.stdout


def test_eager_path_unchanged_outside_scripting():
    # Eager calls still go through the torch.func-aware wrapper (the scripting branch is TorchScript's only).
    x = torch.randn(3, 4)
    w = torch.randn(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = torch.func.grad(lambda w: F.linear_act(x, w).sum())(w)
    torch.testing.assert_close(g, torch.func.grad(lambda w: torch.relu(x @ w).sum())(w))
