"""ONNX export (torch.onnx.export(..., dynamo=True)) of models built from the custom layers, through the
translations customlayers.onnx provides; onnxruntime runs the exported model and gives the eager result."""
import pytest
import torch
from torch import nn

import customlayers
from customlayers.nn import CenteredLayer, MyLinear

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export tests need pip install 'customlayers[onnx]'")
pytest.importorskip("onnxscript", reason="ONNX export tests need pip install 'customlayers[onnx]'")
import customlayers.onnx  # noqa: E402  (needs onnxscript)


def _run_onnxruntime(program, x):
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _op_types(program):
    return {node.op_type for node in program.model_proto.graph.node}


def test_convert_mlp_with_torch_onnx_export():
    """The user's own call: torch.onnx.export with the translations as custom_translation_table."""
    model = customlayers.convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                               nn.Linear(16, 4))).eval()
    x = torch.randn(3, 8)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                custom_translation_table=customlayers.onnx.TRANSLATIONS)
    assert "Relu" in _op_types(program)
    torch.testing.assert_close(_run_onnxruntime(program, x), model(x).detach())


def test_every_layer_with_dynamic_batch():
    """customlayers.onnx.export: every layer (linear_act with and without bias and ReLU, centered over all
    elements and over a dim), run with another batch size than the traced one."""
    model = customlayers.convert(nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), CenteredLayer(dim=(1,)), MyLinear(16, 8, bias=False, activation="none"),
        CenteredLayer(), MyLinear(8, 4))).eval()
    program = customlayers.onnx.export(model, (torch.randn(3, 8),), dynamic_shapes=({0: "batch"},), verbose=False)
    assert {"MatMul", "ReduceMean", "Sub"} <= _op_types(program)
    x = torch.randn(7, 8)
    torch.testing.assert_close(_run_onnxruntime(program, x), model(x).detach())


@pytest.mark.parametrize("act", customlayers._activations.NAMES)
def test_every_activation(act):
    """Each activation's translation gives onnxruntime the eager result."""
    model = nn.Sequential(customlayers.nn.FusedLinear(8, 16, activation=act), nn.Linear(16, 4)).eval()
    x = torch.randn(5, 8) * 3
    program = customlayers.onnx.export(model, (x,), verbose=False)
    torch.testing.assert_close(_run_onnxruntime(program, x), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_export_refuses_dynamo_false():
    with pytest.raises(ValueError, match="dynamo=True"):
        customlayers.onnx.export(nn.Linear(2, 2), (torch.randn(1, 2),), dynamo=False)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_gated_mlp_and_converted_llama_mlp(act):
    """linear_glu's translation: a GatedMLP, and a LLaMA-style MLP convert() made, run by onnxruntime."""
    from benchmarks.bench_mlp import LlamaMLP
    x = torch.randn(5, 64)
    for model in (customlayers.nn.GatedMLP(64, 96, bias=True, activation=act).eval(),
                  customlayers.convert(LlamaMLP(64, 96)).eval()):
        program = customlayers.onnx.export(model, (x,), dynamic_shapes=({0: "batch"},), verbose=False)
        assert "Mul" in _op_types(program)
        y = torch.randn(9, 64)
        torch.testing.assert_close(_run_onnxruntime(program, y), model(y).detach(), rtol=1e-4, atol=1e-5)
