"""torch.export of models built from the custom layers: the exported graph keeps the customlayers ops,
runs (with a dynamic batch), differentiates, survives run_decompositions and a save/load round trip.
Add each new layer to LAYERS."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from customlayers.nn import CenteredLayer, FusedLinear, LinearGELU, LinearReLU, LinearSiLU, MyLinear
from conftest import requires_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = 8

# (id, factory(features) -> module mapping (batch, features) to (batch, features), op it must export to)
LAYERS = [
    ("centered_all", lambda f: CenteredLayer(), "centered"),
    ("centered_dim1", lambda f: CenteredLayer(dim=(1,)), "centered"),
    ("mylinear", lambda f: MyLinear(f, f), "linear_act"),
    ("mylinear_nobias", lambda f: MyLinear(f, f, bias=False), "linear_act"),
    ("linear_relu", lambda f: LinearReLU(f, f), "linear_act"),
    ("linear_gelu", lambda f: LinearGELU(f, f), "linear_act"),
    ("linear_silu", lambda f: LinearSiLU(f, f), "linear_act"),
    ("fused_sigmoid", lambda f: FusedLinear(f, f, activation="sigmoid"), "linear_act"),
]

pytestmark = requires_extension()


def _model(layer_factories):
    """Linear layers around the given custom layers, so the graph mixes aten and customlayers ops."""
    modules = [nn.Linear(FEATURES, FEATURES)]
    for factory in layer_factories:
        modules += [factory(FEATURES), nn.Linear(FEATURES, FEATURES)]
    return nn.Sequential(*modules)


def _export(model):
    batch = torch.export.Dim("batch", min=2)
    return torch.export.export(model, (torch.randn(4, FEATURES),), dynamic_shapes=({0: batch},))


def _custom_ops(ep):
    return [n.target for n in ep.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "customlayers"]


def _check_runs_like_eager(ep, model):
    x = torch.randn(7, FEATURES, requires_grad=True)  # another batch size than the traced one
    y = ep.module()(x)
    torch.testing.assert_close(y, model(x))
    g = torch.randn_like(y)
    grad_ep, = torch.autograd.grad(y, x, g)
    grad_eager, = torch.autograd.grad(model(x), x, g)
    torch.testing.assert_close(grad_ep, grad_eager)


@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_export_each_layer(layer):
    _, factory, op_name = layer
    model = _model([factory])
    ep = _export(model)
    assert getattr(torch.ops.customlayers, op_name).default in _custom_ops(ep)
    assert f"torch.ops.customlayers.{op_name}" in ep.graph_module.code
    _check_runs_like_eager(ep, model)


def test_export_model_with_every_layer():
    model = _model([factory for _, factory, _ in LAYERS])
    ep = _export(model)
    assert len(_custom_ops(ep)) == len(LAYERS)
    _check_runs_like_eager(ep, model)
    # The ops have no decomposition: lowering to core aten keeps them.
    decomposed = ep.run_decompositions()
    assert len(_custom_ops(decomposed)) == len(LAYERS)
    x = torch.randn(3, FEATURES)
    torch.testing.assert_close(decomposed.module()(x), model(x))


def test_export_save_load_round_trip(tmp_path):
    """A saved program loads in a fresh interpreter once the ops are registered (import customlayers)."""
    model = _model([factory for _, factory, _ in LAYERS])
    path = tmp_path / "model.pt2"
    torch.export.save(_export(model), str(path))
    x = torch.randn(5, FEATURES)
    torch.save({"x": x, "y": model(x).detach()}, str(tmp_path / "io.pt"))
    code = textwrap.dedent(f"""
        import torch
        import customlayers  # registers the customlayers ops the program calls
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(ep.module()(io["x"]), io["y"])
        print(sorted({{str(n.target) for n in ep.graph.nodes if "customlayers" in str(n.target)}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "CUSTOMLAYERS_FORCE_FALLBACK"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "customlayers.centered.default" in out.stdout


class SeededNoise(nn.Module):
    """A forward that calls the mutating masked_uniform_ op (seeded, so eager and exported runs agree)."""

    def forward(self, x):
        noise = torch.empty_like(x)
        torch.ops.customlayers.masked_uniform_(noise, -10.0, 10.0, 5.0, 3, 0)
        return x + noise


def test_export_masked_uniform_in_forward():
    model = SeededNoise()
    ep = _export(model)
    assert "masked_uniform_" in [t._opname for t in _custom_ops(ep)]
    x = torch.randn(6, FEATURES)
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
