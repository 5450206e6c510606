"""Quantization of convert()ed models: PyTorch's dynamic quantization maps LinearReLU and FusedLinear to the
native dynamic quantized modules (the same outputs as the native model quantized the same way); torchao's
quantize_ (an optional extra) swaps their weights for quantized tensor subclasses, which they run through
F.linear (eager, backward, torch.compile), and convert() after quantize_ leaves those layers alone."""
import copy
import warnings

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

import customlayers
from conftest import requires_extension
from customlayers.nn import FusedLinear, LinearReLU

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _native():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def _native_dynamic(model, dtype):
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(model).eval(), [["0", "1"], ["2", "3"]])
    return torch.ao.quantization.quantize_dynamic(fused, {nn.Linear, nni.LinearReLU}, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
@pytest.mark.parametrize("how", ["helper_set", "helper_default", "torch_with_our_classes"])
def test_dynamic_quantization_matches_native(how, dtype):
    native = _native()
    ours = customlayers.convert(native)
    assert [type(m) for m in ours] == [LinearReLU, nn.Identity, LinearReLU, nn.Identity, FusedLinear]
    if how == "helper_set":
        quantized = customlayers.quantization.quantize_dynamic(ours, {nn.Linear}, dtype=dtype)
    elif how == "helper_default":
        quantized = customlayers.quantization.quantize_dynamic(ours, dtype=dtype)
    else:  # torch's own, with the default mapping (customlayers registered its classes in it)
        quantized = torch.ao.quantization.quantize_dynamic(ours, {nn.Linear, LinearReLU, FusedLinear}, dtype=dtype)
    assert [type(m) for m in quantized] == [nniqd.LinearReLU, nn.Identity, nniqd.LinearReLU, nn.Identity, nnqd.Linear]
    assert type(ours[0]) is LinearReLU  # inplace=False
    expected = _native_dynamic(native, dtype)
    x = torch.randn(7, 6)
    torch.testing.assert_close(quantized(x), expected(x), rtol=0, atol=0)


def test_dynamic_quantization_dict_spec_and_names():
    ours = customlayers.convert(_native())
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    quantized = customlayers.quantization.quantize_dynamic(ours, {"0": qconfig, "4": qconfig})
    assert [type(m) for m in quantized] == [nniqd.LinearReLU, nn.Identity, LinearReLU, nn.Identity, nnqd.Linear]
    x = torch.randn(3, 6)
    assert quantized(x).shape == (3, 3)


@pytest.mark.parametrize("spec", [None, {nn.Linear}])
def test_torch_spec_naming_nn_linear_leaves_ours_float_with_a_warning(spec):
    # torch's quantize_dynamic picks modules by exact type: its default spec, or {nn.Linear}, skips our classes.
    model = customlayers.convert(_native())
    with pytest.warns(UserWarning) as record:
        quantized = torch.ao.quantization.quantize_dynamic(model, spec)
    assert [type(m) for m in quantized] == [LinearReLU, nn.Identity, LinearReLU, nn.Identity, FusedLinear]
    ours = [str(w.message) for w in record if str(w.message).startswith("customlayers")]
    assert sorted({message.split()[1] for message in ours}) == ["FusedLinear", "LinearReLU"]
    assert all("was given no qconfig, so quantization leaves it in float" in message for message in ours)
    assert not hasattr(quantized[0], "qconfig")  # torch deletes the qconfig it gave, as on nn.Linear
    assert torch.ao.quantization.quantization_mappings.get_default_dynamic_quant_module_mappings()[LinearReLU] \
        is customlayers.quantization.DYNAMIC_MAPPINGS[LinearReLU]


def test_no_qconfig_warning_when_quantized_or_kept_float_by_the_user():
    ours = customlayers.convert(_native())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        customlayers.quantization.quantize_dynamic(ours, {nn.Linear})
        for layer in (ours[0], ours[2], ours[4]):
            layer.qconfig = None  # torch.ao.quantization's way to keep a layer float
        quantized = torch.ao.quantization.quantize_dynamic(ours, {nn.Linear}, inplace=True)
    assert not [w for w in record if str(w.message).startswith("customlayers")]
    assert [type(m) for m in quantized] == [LinearReLU, nn.Identity, LinearReLU, nn.Identity, FusedLinear]
    ours[2].qconfig = torch.ao.quantization.default_dynamic_qconfig
    assert ours[2].qconfig is torch.ao.quantization.default_dynamic_qconfig
    del ours[2].qconfig
    assert not hasattr(ours[2], "qconfig")
    ours[2].__dict__["qconfig"] = torch.ao.quantization.default_dynamic_qconfig  # pickled before the property
    assert ours[2].qconfig is torch.ao.quantization.default_dynamic_qconfig
    del ours[2].qconfig
    assert not hasattr(ours[2], "qconfig") and "qconfig" not in ours[2].__dict__


def test_no_qconfig_warning_names_missing_counterpart_for_other_activations():
    model = nn.Sequential(customlayers.nn.LinearGELU(6, 4))
    with pytest.warns(UserWarning, match=r"LinearGELU was given no qconfig.*no quantized Linear \+ gelu"):
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear})


def _with_stubs(model):
    return nn.Sequential(torch.ao.quantization.QuantStub(), *model, torch.ao.quantization.DeQuantStub())


def _eager_static(model, fuse, x, qat):
    """torch.ao.quantization's eager flow: post-training (prepare, calibrate, convert) or quantization-aware
    (prepare_qat, three SGD steps from the same seed, convert); the native model fused as fuse says."""
    tq = torch.ao.quantization
    model = copy.deepcopy(model).train(qat)
    if fuse:
        model = (tq.fuse_modules_qat if qat else tq.fuse_modules)(model, fuse)
    model.qconfig = tq.get_default_qat_qconfig("x86") if qat else tq.get_default_qconfig("x86")
    (tq.prepare_qat if qat else tq.prepare)(model, inplace=True)
    if qat:
        torch.manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    else:
        model(x)
    return tq.convert(model.eval(), inplace=True)


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_eager_static_quantization_matches_native(qat):
    native = _with_stubs(_native())
    ours = customlayers.convert(native)
    assert [type(m) for m in ours[1:-1]] == [LinearReLU, nn.Identity, LinearReLU, nn.Identity, FusedLinear]
    x = torch.randn(64, 6)
    expected = _eager_static(native, [["1", "2"], ["3", "4"]], x, qat)
    quantized = _eager_static(ours, None, x, qat)
    assert [type(m) for m in quantized] == [type(m) for m in expected]
    assert [type(m) for m in quantized[1:-1]] == [nniq.LinearReLU, nn.Identity, nniq.LinearReLU, nn.Identity,
                                                  nnq.Linear]
    # The observers saw our float outputs, which may differ from nn.Linear's in the last bit: the quantization
    # parameters can then differ by as much, and a value on a rounding boundary by one quantization step.
    torch.testing.assert_close(quantized(x), expected(x), rtol=0, atol=2 * expected[-2].scale)


@requires_extension()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_quantized_input_is_refused_clearly(device):
    q = torch.quantize_per_tensor(torch.randn(3, 6, device=device), 0.1, 0, torch.quint8)
    w = torch.randn(6, 4, device=device)
    with pytest.raises(RuntimeError, match=r"customlayers::linear_act: x is a quantized tensor \(QUInt8 on "
                                           r".*docs/deploy.md \(Quantization\)"):
        customlayers.functional.linear_act(q, w)
    with pytest.raises(RuntimeError, match=r"customlayers::centered: x is a quantized tensor"):
        torch.ops.customlayers.centered(q)


def test_fx_static_quantization_quantizes_the_linears():
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    ours = customlayers.convert(_native()).eval()
    x = torch.randn(64, 6)
    prepared = prepare_fx(ours, torch.ao.quantization.get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    quantized = convert_fx(prepared)
    code = quantized.code
    assert code.count("torch.ops.quantized.linear(") == 3 and "customlayers" not in code
    reference = nn.Sequential(*_native()).eval()
    reference.load_state_dict(ours.state_dict())
    torch.testing.assert_close(quantized(x), reference(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("flow", ["dynamic", "static"])
def test_other_activations_stay_float_with_a_warning(flow):
    from customlayers.nn import LinearGELU
    model = nn.Sequential(torch.ao.quantization.QuantStub(), LinearGELU(6, 8), FusedLinear(8, 4, activation="silu"),
                          torch.ao.quantization.DeQuantStub()).eval()
    x = torch.randn(16, 6)
    with pytest.warns(UserWarning, match=r"LinearGELU \(activation 'gelu'\) has no quantized counterpart") as record:
        if flow == "dynamic":
            quantized = customlayers.quantization.quantize_dynamic(model, {nn.Linear})
        else:
            model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
            prepared = torch.ao.quantization.prepare(copy.deepcopy(model))
            prepared(x)
            quantized = torch.ao.quantization.convert(prepared)
    assert any("FusedLinear (activation 'silu')" in str(w.message) for w in record)
    assert type(quantized[1]) is LinearGELU and type(quantized[2]) is FusedLinear
    if flow == "dynamic":
        torch.testing.assert_close(quantized(x), model(x), rtol=0, atol=0)
    elif customlayers._ops.loaded():  # a float layer behind a QuantStub: the kernel refuses the quantized input
        with pytest.raises(RuntimeError, match="x is a quantized tensor"):
            quantized(x)


# ------------------------------------------------------------------------------------------ torchao

torchao_quantization = pytest.importorskip("torchao.quantization", reason="torchao is not installed (the optional "
                                           "extra 'quantization': pip install 'customlayers[quantization]')")


def _torchao_configs():
    q = torchao_quantization
    return {"int8_weight_only": q.Int8WeightOnlyConfig, "int8_dynamic": q.Int8DynamicActivationInt8WeightConfig,
            "intx_weight_only": q.IntxWeightOnlyConfig}


@pytest.mark.parametrize("config", list(_torchao_configs()))
def test_torchao_quantize_matches_native(config):
    make = _torchao_configs()[config]
    native = _native()
    ours = customlayers.convert(native)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchao_quantization.quantize_(native, make())
        torchao_quantization.quantize_(ours, make())
    assert type(ours[0]) is LinearReLU and type(ours[0].weight) is type(native[0].weight)
    assert type(ours[0].weight) not in (torch.Tensor, nn.Parameter)
    x = torch.randn(5, 6, requires_grad=True)
    xn = x.detach().clone().requires_grad_()
    y, yn = ours(x), native(xn)
    torch.testing.assert_close(y, yn, rtol=0, atol=0)
    y.square().sum().backward()
    yn.square().sum().backward()
    torch.testing.assert_close(x.grad, xn.grad)
    # convert() after quantize_ leaves the quantized Linears alone (their weight is not a plain Parameter).
    with pytest.warns(UserWarning, match="the model is unchanged"):
        again = customlayers.convert(native)
    assert [type(m) for m in again] == [type(m) for m in native]
    torch.testing.assert_close(again(x), yn, rtol=0, atol=0)


def test_torchao_quantized_compiles():
    native = _native()
    ours = customlayers.convert(native)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchao_quantization.quantize_(native, torchao_quantization.Int8WeightOnlyConfig())
        torchao_quantization.quantize_(ours, torchao_quantization.Int8WeightOnlyConfig())
    x = torch.randn(5, 6)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(ours)(x), native(x), rtol=1e-5, atol=1e-5)


def test_plain_weights_still_run_the_op_under_export():
    program = torch.export.export(customlayers.convert(_native()), (torch.randn(4, 6),))
    code = program.graph_module.code
    assert code.count("customlayers.linear_act") == 3 and "aten.linear" not in code


def test_pt2e_leaves_our_layers_float():
    # docs/deploy.md: torchao's PT2E flow sees the exported customlayers.linear_act, which it does not know.
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e", reason="torchao is not installed")
    x86 = pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    ours = customlayers.convert(_native()).eval()
    x = torch.randn(8, 6)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = pt2e.prepare_pt2e(torch.export.export(ours, (x,)).module(), quantizer)
        prepared(x)
        quantized = pt2e.convert_pt2e(prepared)
    assert quantized.code.count("customlayers.linear_act") == 3 and "quantize" not in quantized.code
    torch.testing.assert_close(quantized(x), ours(x), rtol=0, atol=0)
