"""MyLinear / LinearReLU / customlayers.linear_act: correctness against the reference, gradients of
first and second order, errors, torch.compile (opcheck: tests/test_ops.py), module conversion and training,
on every device present."""
import io
import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import customlayers
from customlayers._activations import NAMES as ACTIVATIONS
from customlayers._activations import apply as apply_activation
from customlayers import functional as F
from customlayers import reference
from customlayers.nn import LazyMyLinear, LinearReLU, MyLinear
from conftest import (BLAS16_MODES, BLAS32_MODES, DEVICES, FLOAT_DTYPES, assert_compiled_matches_eager,
                      requires_extension, run_16bit_checks, run_float32_checks)

# Tolerances relative to the float64 reference; reduced precision scales with sqrt(in_features).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (x shape, in, out): 1x1x1, odd sizes, 1-row inputs, 3-D inputs, sizes past a row block, a narrow BLAS
# output layer (out < 16: GEMMs reoriented), zero sizes.
SHAPES = [((1, 1), 1, 1), ((7, 5), 5, 3), ((1, 33), 33, 17), ((2, 3, 20), 20, 9), ((5,), 5, 4),
          ((130, 65), 65, 70), ((600, 20), 20, 31), ((70, 100), 100, 10), ((0, 4), 4, 3), ((3, 0), 0, 5),
          ((3, 4), 4, 0)]


def make(shape, k, n, dtype=torch.float64, device="cpu", transposed=False, bias=True, requires_grad=False):
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device).t() if transposed else torch.randn(k, n, dtype=dtype,
                                                                                          device=device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    if requires_grad:
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_()
    return x, w, b


def check_close(y, expected, dtype, k):
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    tol = TOL[dtype] * max(1.0, k ** 0.5)
    torch.testing.assert_close(y.double(), expected.double(), rtol=tol, atol=tol * scale)



# The activations whose backward reads the output (and 'none'): with huge inputs the gelu/silu backward reads a
# pre-activation that overflowed where the float64 one is finite (as native F.gelu's backward does).
OUTPUT_SAVING = [a for a in ACTIVATIONS if customlayers._activations.ACTIVATIONS[a].saves != "pre"]


def saved_for_backward(x, w, b, act):
    """linear_act_backward's `out` for act: the output (relu, tanh, sigmoid), the pre-activation (gelu,
    gelu_tanh, silu), None for 'none'."""
    with torch.no_grad():
        saves = customlayers._activations.ACTIVATIONS[act].saves
        return None if saves == "nothing" else F.linear_act(x, w, b, act if saves == "output" else "none")

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(device, dtype, act, transposed, shape):
    x, w, b = make(*shape, dtype=dtype, device=device, transposed=transposed)
    y = F.linear_act(x, w, b, act)
    assert y.shape == (*x.shape[:-1], w.shape[1]) and y.dtype == dtype and y.device == x.device
    check_close(y, reference.linear_act(x.double(), w.double(), b.double(), act), dtype, shape[1])
    check_close(F.linear_act(x, w, None, act), reference.linear_act(x.double(), w.double(), None, act), dtype,
                shape[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("transposed", [False, True])
# Small weights (in <= 64, in * out <= 64K: hand-written CPU GEMMs) up to that limit, then BLAS-sized ones;
# narrow outputs (out <= 16, 32 <= in <= 8192: hand-written dot products, dW transposed) at their edges:
# in not a whole number of vectors or tiles, one output, 16 outputs, rows past a dW block, longest rows.
@pytest.mark.parametrize("shape", [((600, 20), 20, 31), ((2, 3, 20), 20, 9), ((515, 64), 64, 1024),
                                   ((70, 63), 63, 1041), ((64, 300), 300, 257), ((300, 257), 257, 10),
                                   ((3, 43, 32), 32, 1), ((130, 100), 100, 16), ((5, 8192), 8192, 3),
                                   ((9, 8193), 8193, 3)], ids=str)
def test_backward_matches_reference(device, dtype, act, transposed, shape):
    x, w, b = make(*shape, dtype=dtype, device=device, transposed=transposed, requires_grad=True)
    g = torch.randn(*shape[0][:-1], shape[2], dtype=dtype, device=device)
    ours = torch.autograd.grad(F.linear_act(x, w, b, act), (x, w, b), g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(reference.linear_act(xd, wd, bd, act), (xd, wd, bd), g.double())
    for o, r, k in zip(ours, ref, (shape[2], shape[0][0], shape[0][0])):
        assert o.dtype == dtype
        check_close(o, r, dtype, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [((1, 1), 1, 1), ((7, 5), 5, 3), ((2, 3, 4), 4, 5), ((3,), 3, 2), ((70, 3), 3, 2)],
                         ids=str)
def test_gradcheck(device, act, transposed, bias, shape):
    x, w, b = make(*shape, device=device, transposed=transposed, bias=bias, requires_grad=True)
    inputs = (x, w) if b is None else (x, w, b)

    def fn(x, w, b=None):
        return F.linear_act(x, w, b, act)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_only_needed_gradients(device):
    """The first layer's input needs no gradient: only dW and db are computed."""
    x, w, b = make((9, 4), 4, 6, device=device)
    w.requires_grad_()
    y = F.linear_act(x, w, b)
    y.sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None
    expected, = torch.autograd.grad(reference.linear_act(x, w, b).sum(), w)
    torch.testing.assert_close(w.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_weight_grad_layout(device):
    """nn.Linear's weight is used through .t() without a copy; its gradient lands contiguous."""
    lin = nn.Linear(6, 4, device=device, dtype=torch.float64)
    x = torch.randn(5, 6, device=device, dtype=torch.float64)
    F.linear_act(x, lin.weight.t(), lin.bias).sum().backward()
    assert lin.weight.grad.is_contiguous()
    expected, = torch.autograd.grad(torch.relu(lin(x)).sum(), lin.weight)
    torch.testing.assert_close(lin.weight.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    x = torch.randn(9, 20, dtype=torch.float64, device=device)[:, ::2]
    w = torch.randn(30, 8, dtype=torch.float64, device=device)[::3]
    b = torch.randn(16, dtype=torch.float64, device=device)[::2]
    torch.testing.assert_close(F.linear_act(x, w, b), reference.linear_act(x, w, b))
    xe = torch.randn(1, 10, dtype=torch.float64, device=device).expand(4, 10)
    torch.testing.assert_close(F.linear_act(xe, w, b), reference.linear_act(xe, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_reduced_precision_strided_blas_sizes(device, dtype, transposed):
    """float16/bfloat16 with in_features > 64 (BLAS GEMMs; on CPUs without native dot products for these
    dtypes they run in float32), with strided x, weight and grad, forward and backward."""
    m, k, n = 70, 100, 90
    x = torch.randn(m, 2 * k, dtype=dtype, device=device)[:, ::2].requires_grad_()
    w = (torch.randn(n, k + 5, dtype=dtype, device=device)[:, :k].t() if transposed
         else torch.randn(k, n + 5, dtype=dtype, device=device)[:, :n]).requires_grad_()
    b = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(m, n + 3, dtype=dtype, device=device)[:, :n]
    for act in ACTIVATIONS:
        y = F.linear_act(x, w, b, act)
        ours = torch.autograd.grad(y, (x, w, b), g)
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
        yr = reference.linear_act(xd, wd, bd, act)
        check_close(y, yr, dtype, k)
        ref = torch.autograd.grad(yr, (xd, wd, bd), g.double())
        for o, r, kk in zip(ours, ref, (n, m, m)):
            assert o.dtype == dtype and o.shape == r.shape
            check_close(o, r, dtype, kk)
        # Asked for alone, each gradient is the same (on CPU bit for bit: the kernel then widens only what it
        # reads, and computes the rest alike).
        out = saved_for_backward(x, w, b, act)
        for i in range(3):
            alone = torch.ops.customlayers.linear_act_backward(g, x.detach(), w.detach(), out, act,
                                                               [j == i for j in range(3)])[i]
            if device == "cpu":
                torch.testing.assert_close(alone, ours[i], rtol=0, atol=0)
            else:
                check_close(alone, ours[i], dtype, k)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_nan_and_mask(device):
    x = torch.tensor([[1.0, float("nan")], [-1.0, 0.0]], device=device)
    w = torch.eye(2, device=device, requires_grad=True)
    y = F.linear_act(x, w)
    ref = torch.relu(x @ w.detach())
    torch.testing.assert_close(y, ref, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [20, 300], ids=["small_weight", "blas"])
@pytest.mark.parametrize("nan_in", ["x", "weight", "bias"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_relu_backward_nan_like_torch(device, dtype, k, nan_in, create_graph):
    """torch.relu's backward passes the gradient wherever the output is not <= 0, a NaN output included:
    dx, dweight and dbias equal nn.Linear + ReLU's, NaNs in the same places, on both backward paths
    (the fused kernel, and the differentiable ops of create_graph=True)."""
    torch.manual_seed(0)
    x, w, b = make((70, k), k, 30, dtype=dtype, device=device)
    {"x": x, "weight": w, "bias": b}[nan_in].view(-1)[3] = float("nan")
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    native = [t.clone().requires_grad_() for t in (x, w, b)]
    y = F.linear_act(*ours)
    expected_y = torch.relu(native[0] @ native[1] + native[2])
    tol = TOL[dtype] * k ** 0.5
    truth = torch.relu(x.double() @ w.double() + b.double())
    torch.testing.assert_close(y.double(), truth, equal_nan=True, rtol=tol, atol=tol * 10)
    assert torch.equal(y.isnan(), expected_y.isnan())
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, ours, g, create_graph=create_graph)
    expected = torch.autograd.grad(expected_y, native, g)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, expected):
        assert torch.equal(a.isnan(), e.isnan()), name
        torch.testing.assert_close(a, e, equal_nan=True, rtol=tol, atol=tol * 10, msg=name)


def test_book_examples():
    linear = MyLinear(5, 3)
    assert linear.weight.shape == (5, 3) and linear.bias.shape == (3,)
    net = nn.Sequential(MyLinear(64, 8), MyLinear(8, 1))
    assert net(torch.rand(2, 64)).shape == (2, 1)
    x = torch.rand(2, 5)
    torch.testing.assert_close(linear(x), torch.relu(x @ linear.weight + linear.bias))


def test_mylinear_init():
    torch.manual_seed(1)
    ours = MyLinear(20, 7)
    torch.manual_seed(1)
    ref = nn.Linear(20, 7)
    assert torch.equal(ours.weight, ref.weight.t()) and torch.equal(ours.bias, ref.bias)
    torch.manual_seed(2)
    book = MyLinear(4, 3, init="randn")
    torch.manual_seed(2)
    assert torch.equal(book.weight, torch.randn(4, 3)) and torch.equal(book.bias, torch.randn(3))
    assert MyLinear(3, 2, bias=False).bias is None
    with pytest.raises(ValueError, match="activation must be"):
        MyLinear(3, 2, activation="swish")
    with pytest.raises(ValueError, match="init must be"):
        MyLinear(3, 2, init="zeros")


def test_mylinear_activation_none():
    layer = MyLinear(3, 2, activation="none")
    x = -torch.rand(4, 3) * 10
    torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias)


def test_lazy_mylinear():
    layer = LazyMyLinear(6)
    y = layer(torch.randn(4, 9))
    assert type(layer) is MyLinear and layer.weight.shape == (9, 6) and layer.in_units == 9
    x = torch.randn(4, 9)
    torch.testing.assert_close(layer(x), torch.relu(x @ layer.weight + layer.bias))
    no_bias = LazyMyLinear(2, bias=False)
    no_bias(torch.randn(1, 3))
    assert no_bias.bias is None and no_bias.weight.shape == (3, 2)


def test_linear_relu_matches_nn_linear():
    torch.manual_seed(3)
    ours = LinearReLU(12, 5)
    torch.manual_seed(3)
    ref = nn.Linear(12, 5)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(ours(x), torch.relu(ref(x)))
    ref2 = nn.Linear(12, 5)
    ref2.load_state_dict(ours.state_dict())
    ours.load_state_dict(nn.Linear(12, 5).state_dict())


def test_from_linear_and_to_linear_share_parameters():
    lin = nn.Linear(4, 3)
    fused = LinearReLU.from_linear(lin)
    assert fused.weight is lin.weight and fused.bias is lin.bias
    back = fused.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight and back.bias is lin.bias
    x = torch.randn(2, 4)
    torch.testing.assert_close(fused(x), torch.relu(lin(x)))
    torch.testing.assert_close(back(x), lin(x))
    nobias = LinearReLU.from_linear(nn.Linear(4, 3, bias=False))
    assert nobias.bias is None and nobias.to_linear().bias is None
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        LinearReLU.from_linear(nn.ReLU())


def _mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 16), nn.ReLU()), nn.Linear(16, 1))


def test_convert_equivalence_and_state_dict():
    model = _mlp()
    converted = customlayers.convert(model)
    assert type(model[0]) is nn.Linear  # inplace=False leaves the original alone
    assert type(converted[0]) is LinearReLU and type(converted[1]) is nn.Identity
    assert type(converted[2][0]) is LinearReLU and type(converted[3]) is customlayers.nn.FusedLinear
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(8, 10)
    torch.testing.assert_close(converted(x), model(x))
    # A checkpoint of the original loads into the converted model (weights_only) and back.
    buffer = io.BytesIO()
    torch.save(_mlp().state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    converted.load_state_dict(state)
    model.load_state_dict(state)
    torch.testing.assert_close(converted(x), model(x))
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    fresh = _mlp()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), converted(x))
    assert customlayers.convert(model, inplace=True) is model and type(model[0]) is LinearReLU


def test_convert_keeps_tied_layers_shared():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(6, 1))
    converted = customlayers.convert(model)
    assert converted[0] is converted[2] and type(converted[0]) is LinearReLU
    assert len(list(converted.parameters())) == len(list(model.parameters()))
    x = torch.randn(4, 6)
    torch.testing.assert_close(converted(x), model(x))
    model(x).sum().backward()
    converted(x).sum().backward()
    torch.testing.assert_close(converted[0].weight.grad, model[0].weight.grad)
    torch.testing.assert_close(converted[0].bias.grad, model[0].bias.grad)


def _train(model, steps=100):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = (x[:, :1] * 2 - x[:, 1:2].sin() + 0.5 * x[:, 2:3] * x[:, 3:4])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def test_training_matches_native_mlp():
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    fused = customlayers.convert(native)
    native_loss = _train(native)
    fused_loss = _train(fused)
    assert fused_loss == pytest.approx(native_loss, rel=1e-3)
    assert native_loss < 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["dtype_w", "dtype_b", "int", "in_size", "bias_size", "weight_dim", "act",
                                 "scalar_x"])
def test_bad_input_errors(device, bad):
    x, w, b = make((3, 4), 4, 5, dtype=torch.float32, device=device)
    cases = {
        "dtype_w": ((x, w.double(), b), TypeError, r"same dtype, but x is .* and weight is"),
        "dtype_b": ((x, w, b.half()), TypeError, r"same dtype, but x is .* and bias is"),
        "int": ((torch.ones(3, 4, dtype=torch.long, device=device), w, b), TypeError, "floating-point"),
        "in_size": ((torch.randn(3, 6, device=device), w, b), RuntimeError,
                    r"x has shape \[3, 6\] and weight has shape \[4, 5\]"),
        "bias_size": ((x, w, b[:3]), RuntimeError, r"expected bias of shape \[5\].*got shape \[3\]"),
        "weight_dim": ((x, w.flatten(), b), RuntimeError, "expected weight to be 2-D"),
        "act": ((x, w, b, "swish"), ValueError, "linear_act: act must be one of 'none', 'relu', 'gelu', 'gelu_tanh', "
                "'silu', 'tanh', 'sigmoid', but got 'swish'"),
        "scalar_x": ((torch.tensor(1.0, device=device), w, b), RuntimeError, "at least 1 dimension"),
    }
    args, exc, msg = cases[bad]
    with pytest.raises(exc, match=msg):
        F.linear_act(*args)
    if customlayers._ops.loaded():
        with pytest.raises(exc, match=msg):
            torch.ops.customlayers.linear_act(*args)


@pytest.mark.parametrize("path", ["kernel", "fallback"])
def test_backward_op_dtype_errors(path, request):
    """linear_act_backward refuses a grad or out of another dtype than x, on both paths."""
    if path == "fallback":
        request.getfixturevalue("cpu_fallback")
    x, w, _ = make((3, 4), 4, 5, dtype=torch.float32)
    g = torch.randn(3, 5)
    for grad, out in ((g.double(), g), (g, g.double())):
        with pytest.raises(TypeError, match="same dtype"):
            torch.ops.customlayers.linear_act_backward(grad, x, w, out, "relu", [True, True, True])


def test_fallback_errors_match(cpu_fallback):
    """The pure-PyTorch path raises the same exception types and messages."""
    x, w, b = make((3, 4), 4, 5, dtype=torch.float32)
    with pytest.raises(TypeError, match="same dtype"):
        F.linear_act(x, w.double(), b)
    with pytest.raises(RuntimeError, match=r"x has shape \[3, 4\] and weight has shape \[5, 5\]"):
        F.linear_act(x, torch.randn(5, 5), b)
    with pytest.raises(ValueError, match="act must be"):
        F.linear_act(x, w, b, "swish")
    torch.testing.assert_close(F.linear_act(x, w, b), reference.linear_act(x, w, b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a CUDA device")
def test_mixed_devices_error():
    x, w, b = make((3, 4), 4, 5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="one device"):
        F.linear_act(x.cuda(), w, b)
    with pytest.raises(RuntimeError, match="one device"):
        F.linear_act(x, w, b.cuda())


@requires_extension()
@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_errors(device):
    x, w, _ = make((3, 4), 4, 5, dtype=torch.float32, device=device)
    op = torch.ops.customlayers.linear_act_backward.default
    with pytest.raises(RuntimeError, match=r"expected grad of shape \[3, 5\]"):
        op(torch.randn(3, 4, device=device), x, w, None, "none", [True, True, True])
    with pytest.raises(RuntimeError, match="act='relu' needs `out`: the forward's output"):
        op(torch.randn(3, 5, device=device), x, w, None, "relu", [True, True, True])
    with pytest.raises(RuntimeError, match="act='gelu' needs `out`: the pre-activation"):
        op(torch.randn(3, 5, device=device), x, w, None, "gelu", [True, True, True])
    with pytest.raises(ValueError, match="linear_act_backward: act must be one of .*but got 'swish'"):
        op(torch.randn(3, 5, device=device), x, w, None, "swish", [True, True, True])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", [((7, 5), 5, 3), ((2, 3, 20), 20, 9), ((130, 65), 65, 70), ((70, 100), 100, 10),
                                   ((0, 4), 4, 3), ((3, 0), 0, 5)], ids=str)
def test_weight_t_is_the_transposed_view(device, dtype, act, shape):
    """weight_t=True takes nn.Linear's (out, in) weight as it is: the same kernel as on its .t() view, so the
    same bits, forward and backward, and one autograd node (no TBackward0) between the op and the weight."""
    x, w, b = make(*shape, dtype=dtype, device=device, transposed=True, requires_grad=True)
    weight = w.detach().t().requires_grad_()  # (out, in), contiguous
    y = F.linear_act(x, weight, b, act, weight_t=True)
    assert torch.equal(y, F.linear_act(x, weight.t(), b, act))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, weight, b), g)
    expected = torch.autograd.grad(F.linear_act(x, weight.t(), b, act), (x, weight, b), g)
    for a, e in zip(got, expected):
        assert torch.equal(a, e) and a.stride() == e.stride()
    assert y.grad_fn.next_functions[1][0].variable is weight  # AccumulateGrad of weight itself


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_weight_t_gradcheck(device, bias):
    x, w, b = make((2, 3, 4), 4, 5, device=device, bias=bias, requires_grad=True)
    weight = w.detach().t().contiguous().requires_grad_()
    for act in ACTIVATIONS:
        def fn(x, weight, b=None):
            return F.linear_act(x, weight, b, act, weight_t=True)
        inputs = (x, weight) if b is None else (x, weight, b)
        assert torch.autograd.gradcheck(fn, inputs) and torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    model = nn.Sequential(MyLinear(8, 16), LinearReLU(16, 8), MyLinear(8, 3, activation="none")).to(device)
    x = torch.randn(5, 8, device=device)
    assert_compiled_matches_eager(model, x)
    for act in ACTIVATIONS[2:]:
        model = nn.Sequential(customlayers.nn.FusedLinear(8, 16, activation=act), MyLinear(16, 3, activation=act))
        assert_compiled_matches_eager(model.to(device), x)


@requires_extension()
def test_torch_compile_training_past_one_activation_block():
    """A gelu/silu pre-activation of several of the training forward's fixed activation blocks (2^18
    elements, split over threads in eager) traces as one call: compiled gradients equal eager's."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for act in ("gelu", "silu"):
            model = customlayers.nn.FusedLinear(32, 1100, activation=act)
            assert_compiled_matches_eager(model, torch.randn(600, 32))
    finally:
        torch.set_num_threads(before)


# The narrow-output backward reads rows of x in place for the tiles of dW^T that lie within them: (rows, in,
# out, dtype) whose in_features end inside a tile of two vectors after whole tiles, for 16-, 8- and 4-lane
# vectors (float32 on AVX-512 and AVX2, float64 on both).
GUARDED_NARROW_SHAPES = [(64, 49, 10, "float32"), (64, 55, 10, "float32"), (64, 49, 10, "float64"),
                         (64, 37, 10, "float64")]

_GUARDED_X_CHECK = """
import ctypes, mmap, sys, torch, customlayers
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE
torch.manual_seed(0)
for m, k, n, name in SHAPES:
    dtype = getattr(torch, name)
    nbytes = m * k * dtype.itemsize
    size = (nbytes + page - 1) // page * page
    base = libc.mmap(None, size + page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    assert libc.mprotect(base + size, page, 0) == 0  # PROT_NONE: the page after x is unreadable
    x = torch.frombuffer((ctypes.c_char * nbytes).from_address(base + size - nbytes), dtype=dtype).view(m, k)
    x.copy_(torch.randn(m, k, dtype=dtype))
    w, b, g = torch.randn(k, n, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    out = torch.ops.customlayers.linear_act(x, w, b, "relu")
    _, dw, _ = torch.ops.customlayers.linear_act_backward(g, x, w, out, "relu", [False, True, False])
    expected = x.double().t() @ (g.double() * (out > 0))
    torch.testing.assert_close(dw.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
print("ok")
"""


@requires_extension()
def test_narrow_backward_reads_nothing_past_x():
    """dW of a narrow output layer (out <= 16) with x ending where an unreadable page begins: the tiles read
    from x in place end within its rows (a read past its last row would fault), the rest come from a copy.
    In a subprocess, so that a fault fails this test alone."""
    code = "SHAPES = " + repr(GUARDED_NARROW_SHAPES) + "\n" + _GUARDED_X_CHECK
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.returncode, result.stderr[-2000:])


# (rows, in, out) on every CPU path: small weights, narrow outputs, and BLAS GEMMs cut into one tile, into
# row tiles, into row and column tiles, and with a narrow row-major right operand (out < 16, in > 8192).
THREAD_SHAPES = [(3000, 17, 33), (3000, 100, 10), (3000, 300, 33), (40, 300, 70), (64, 1024, 700),
                 (2048, 784, 256), (40, 9000, 5)]


@requires_extension()
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_cpu_results_independent_of_thread_count(dtype, shape, transposed, act):
    """Output and every gradient are the same bits for 1, 2 and 3 threads on every CPU path: BLAS GEMMs
    run as tiles fixed by the shapes, each on one thread; sums over rows in fixed chunks."""
    _check_same_bits_on_any_thread_count(dtype, shape, transposed, act)


def _check_same_bits_on_any_thread_count(dtype, shape, transposed, act):
    m, k, n = shape
    x, w, b = make((m, k), k, n, dtype=dtype, transposed=transposed, requires_grad=True)
    g = torch.randn(m, n, dtype=dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = F.linear_act(x, w, b, act)
            with torch.no_grad():
                inference = F.linear_act(x, w, b, act)  # the fused forward (gelu/silu train from z)
            results.append((y, inference, *torch.autograd.grad(y, (x, w, b), g)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, o in zip(results[0], other):
            assert torch.equal(a, o)


def _accuracy_errors(dtype, shape, bias, transposed, act):
    """Error of y, dx, dW, db against float64 (max abs error / max abs value), ours and nn.Linear's +
    activation in the same dtype."""
    m, k, n = shape
    torch.manual_seed(sum(shape))
    x = torch.randn(m, k, dtype=dtype)
    w_lin = (torch.randn(n, k) / k ** 0.5).to(dtype)  # nn.Linear's (out, in)
    b = torch.randn(n, dtype=dtype) if bias else None
    g = torch.randn(m, n, dtype=dtype)
    def activation(t):
        return apply_activation(act, t)

    def run(fn, *inputs):
        inputs = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        y = fn(*inputs)
        grads = torch.autograd.grad(y, [t for t in inputs if t is not None], g.to(y.dtype))
        return [y, *grads]

    def ours(x, w, b):
        return F.linear_act(x, w if transposed else w.t(), b, act, weight_t=transposed)

    def native(x, w, b):
        return activation(torch.nn.functional.linear(x, w, b))

    truth = run(native, x.double(), w_lin.double(), None if b is None else b.double())

    def errors(values):
        return [((v.double() - t).abs().max() / t.abs().max().clamp_min(1e-30)).item() for v, t in zip(values, truth)]
    return errors(run(ours, x, w_lin, b)), errors(run(native, x, w_lin, b))


# Sizes on the small-weight, narrow-output and BLAS paths (one BLAS case cut into column tiles).
ACCURACY_SHAPES = [(256, 20, 256), (256, 256, 10), (512, 300, 130), (64, 700, 600)]


def check_accuracy_like_native(dtypes=(torch.float16, torch.bfloat16), shapes=ACCURACY_SHAPES):
    """Every float16/bfloat16 path rounds once: errors at most 1.5x nn.Linear's + activation (plus 1% of the
    dtype's epsilon, for errors that are exactly zero natively). Raises AssertionError listing failures."""
    failures = []
    for dtype in dtypes:
        eps = torch.finfo(dtype).eps
        for shape in shapes:
            for bias in (True, False):
                for transposed in (True, False):
                    for act in ACTIVATIONS:
                        ours, native = _accuracy_errors(dtype, shape, bias, transposed, act)
                        for name, o, r in zip(("y", "dx", "dW", "db"), ours, native):
                            if o > 1.5 * r + 0.01 * eps:
                                failures.append(f"{dtype} {shape} bias={bias} weight_t={transposed} {act} {name}: "
                                                f"ours {o:.3g} vs nn.Linear {r:.3g}")
    assert not failures, "\n".join(failures)


def check_bf16_views_and_specials():
    """bfloat16 forwards of every activation on the BLAS path (no autograd: the fused forward), with x and
    the weight as views of other strides (transposed, sliced), odd in_features, tails of rows and columns,
    more rows than columns and fewer (the AVX512-BF16 kernel then packs x instead of an (out, in) weight),
    and NaN/inf in x: NaN and inf where the float64 reference has them, the rest within 1.5x nn.Linear +
    activation's error (as check_accuracy_like_native). Raises AssertionError listing failures.

    One exception: where nn.Linear's own NaN/inf differ from the reference's, ours may have nn.Linear's for
    none and relu. oneDNN's AMX bfloat16 GEMM (up to 3.13; torch 2.14's) leaks NaN/inf into the row before
    when K > 32 and K % 32 != 0 (uxlfoundation/oneDNN#5717), and CUSTOMLAYERS_CPU_BLAS16=native or dot
    runs the none/relu forward on that GEMM, as nn.Linear does."""
    failures = []
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(75, 131, 45), (21, 131, 90)]:
        x_base = torch.randn(2 * k, 2 * k, generator=g).bfloat16()
        w_base = (torch.randn(2 * k, 2 * n, generator=g) / k ** 0.5).bfloat16()  # (in, out) and (out, in) = .t()
        b = torch.randn(n, generator=g).bfloat16()
        xs = {"contiguous": x_base[:m, :k].contiguous(), "row stride > k": x_base[:m, 3:k + 3],
              "transposed": x_base[:k, :m].t()}
        specials = xs["contiguous"].clone()
        specials[3, 5], specials[7, 9], specials[11, 0] = float("nan"), float("inf"), -float("inf")
        xs["nan and inf"] = specials
        weights = {"(in, out)": (w_base[:k, :n].contiguous(), False), "(in, out) sliced": (w_base[1:k + 1, :n], False),
                   "(out, in)": (w_base[:k, :n].t().contiguous(), True),
                   "(out, in) sliced": (w_base.t().contiguous()[:n, 5:k + 5], True)}
        for (xname, x), (wname, (w, weight_t)), act in itertools.product(xs.items(), weights.items(), ACTIVATIONS):
            w_in_out = w.t() if weight_t else w
            with torch.no_grad():
                ours = F.linear_act(x, w, b, act, weight_t=weight_t)
                native = apply_activation(act, x @ w_in_out + b)
            truth = apply_activation(act, x.double() @ w_in_out.double() + b.double())
            what = f"{(m, k, n)}, x {xname}, weight {wname}, {act}"
            nan_inf = lambda t: (t.isnan(), t.isinf())  # noqa: E731
            allowed = (truth, native) if act in ("none", "relu") else (truth,)  # the acts on BLAS's rounded output
            if not any(all(map(torch.equal, nan_inf(ours), nan_inf(t))) for t in allowed):
                failures.append(f"{what}: NaN/inf differ from the reference's (and nn.Linear's)")
                continue
            finite = truth.isfinite() & ours.isfinite()
            if finite.any():
                scale = truth[finite].abs().max()
                o, r = ((t[finite].double() - truth[finite]).abs().max() / scale for t in (ours, native))
                if o > 1.5 * r + 0.01 * torch.finfo(torch.bfloat16).eps:
                    failures.append(f"{what}: error {o:.3g} vs nn.Linear's {r:.3g}")
    assert not failures, "\n".join(failures)




# float32 on the BLAS path: K over several of gemm_f32's reduction slices, more columns than one of its
# blocks, row and column tails, one row, a narrow output past the narrow kernels' in_features (GEMMs
# reoriented), dW summed over row chunks.
FLOAT32_SHAPES = [(512, 300, 130), (64, 700, 600), (1, 300, 40), (33, 65, 1100), (70, 257, 33), (40, 9000, 5),
                  (3000, 100, 20)]


def check_float32_like_native():
    """float32 on the BLAS path, whichever GEMM runs it (CUSTOMLAYERS_CPU_BLAS32): errors of y, dx, dW, db at
    most 1.5x nn.Linear + activation's; x and the weight as views of other strides; NaN and inf in x where the
    float64 reference has them; the same bits on 1, 2 and 3 threads. Raises AssertionError at the first
    failure (the accuracy check's lists them all)."""
    check_accuracy_like_native((torch.float32,), FLOAT32_SHAPES)
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(75, 131, 45), (21, 300, 90)]:
        x_base, w_base = torch.randn(2 * k, 2 * k, generator=g), torch.randn(2 * k, 2 * n, generator=g) / k ** 0.5
        b = torch.randn(n, generator=g)
        specials = x_base[:m, :k].clone()
        specials[3, 5], specials[7, 9], specials[11, 0] = float("nan"), float("inf"), -float("inf")
        xs = {"row stride > k": x_base[:m, 3:k + 3], "transposed": x_base[:k, :m].t(), "nan and inf": specials}
        weights = {"(in, out) sliced": (w_base[1:k + 1, :n], False), "(out, in)": (w_base[:k, :n].t().contiguous(), True),
                   "(out, in) sliced": (w_base.t().contiguous()[:n, 5:k + 5], True)}
        for (xname, x), (wname, (w, weight_t)), act in itertools.product(xs.items(), weights.items(), ACTIVATIONS):
            w_in_out = w.t() if weight_t else w
            inputs = [t.detach().requires_grad_() for t in (x, w, b)]
            y = F.linear_act(*inputs, act, weight_t=weight_t)
            leaves = [t.detach().double().requires_grad_() for t in (x, w_in_out, b)]
            truth = apply_activation(act, leaves[0] @ leaves[1] + leaves[2])
            what = f"{(m, k, n)}, x {xname}, weight {wname}, {act}"
            with torch.no_grad():  # NaN/inf as float64's, or as torch's float32 function's (gelu(inf) is NaN there)
                native = apply_activation(act, x @ w_in_out + b)
            assert any(torch.equal(y.isnan(), t.isnan()) and torch.equal(y.isinf(), t.isinf()) for t in (truth, native)), what
            finite = truth.isfinite() & y.isfinite()
            torch.testing.assert_close(y[finite].double(), truth[finite], rtol=1e-5, atol=1e-5, msg=what)
            if xname != "nan and inf":
                grad = torch.randn(m, n, generator=g)
                ours = torch.autograd.grad(y, inputs, grad)
                native = torch.autograd.grad(truth, leaves, grad.double())
                for o, e in zip(ours, (native[0], native[1].t() if weight_t else native[1], native[2])):
                    torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-4, msg=what)
    for shape in [(2048, 784, 256), (64, 1024, 700)]:
        _check_same_bits_on_any_thread_count(torch.float32, shape, True, "gelu")


@requires_extension()
@pytest.mark.parametrize("blas32", BLAS32_MODES)
def test_float32_blas_paths(blas32):
    """check_float32_like_native, and check_accuracy_like_native with the 16-bit GEMMs in float32, with each
    float32 GEMM of the BLAS path forced (CUSTOMLAYERS_CPU_BLAS32): BLAS's ('native') and the hand-written
    one of gemm_f32.h ('own', on the avx2 and avx512 tiers; skipped with the reason on the default tier)."""
    run_float32_checks("test_linear_act", blas32)


@requires_extension()
@pytest.mark.parametrize("blas16", BLAS16_MODES)
def test_reduced_precision_accuracy_like_native(blas16):
    """float16/bfloat16 against a float64 reference on every CPU path, with and without bias, weight_t both
    ways: each error (y, dx, dW, db) at most 1.5x that of nn.Linear + the activation in the same dtype; and
    the bfloat16 forward with views and NaN/inf (check_bf16_views_and_specials). Each way of running 16-bit
    GEMMs is forced (CUSTOMLAYERS_CPU_BLAS16): 'native' (16-bit operands, float32 accumulation; ATen's
    generic GEMM where the CPU has no 16-bit dot products) and 'float' (operands widened to float32) on any
    CPU; 'dot' and 'amx' (the AVX512-BF16 and AMX kernels of the bfloat16 forwards that round once) where
    the CPU has them."""
    run_16bit_checks("test_linear_act", blas16)


@requires_extension()
def test_bf16_forward_between_other_amx_users():
    """On CPUs with AMX, PyTorch's bfloat16 attention (ATen's brgemm) and the AMX kernel of the bfloat16
    forwards configure the same thread's tiles: each must still be right when they alternate."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 256, 64).bfloat16()
    x, w = torch.randn(300, 131).bfloat16(), (torch.randn(131, 90) / 131 ** 0.5).bfloat16()
    attention = torch.nn.functional.scaled_dot_product_attention
    expected = attention(q.double(), q.double(), q.double())
    truth = torch.nn.functional.gelu(x.double() @ w.double())
    for _ in range(3):
        a = attention(q, q, q)
        y = F.linear_act(x, w, None, "gelu")
        torch.testing.assert_close(a.double(), expected, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(y.double(), truth, atol=1e-2, rtol=2 ** -7)


@requires_extension()
@pytest.mark.parametrize("variable, value, dtype, message", [
    ("CUSTOMLAYERS_CPU_BLAS16", "fast", "bfloat16", "CUSTOMLAYERS_CPU_BLAS16 must be 'native', 'float', 'dot' or 'amx'"),
    ("CUSTOMLAYERS_CPU_BLAS32", "mkl", "float32", "CUSTOMLAYERS_CPU_BLAS32 must be 'native' or 'own'")])
def test_bad_blas_setting_is_refused(variable, value, dtype, message):
    code = ("import torch, customlayers\n"
            f"x, w = torch.randn(70, 100, dtype=torch.{dtype}), torch.randn(100, 90, dtype=torch.{dtype})\n"
            "try:\n    customlayers.functional.linear_act(x, w)\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, variable: value, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert message in out.stdout, out.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@requires_extension()
def test_cuda_deterministic_and_current_stream():
    x, w, b = make((1000, 77), 77, 130, dtype=torch.float32, device="cuda", requires_grad=True)
    g = torch.randn(1000, 130, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        first = torch.autograd.grad(F.linear_act(x, w, b), (x, w, b), g)
        second = torch.autograd.grad(F.linear_act(x, w, b), (x, w, b), g)
    s.synchronize()
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def _gemm_path_shapes():
    """(x shape, in, out) for the CUDA GEMM's large tiles (128 x 128 tiles for every SM, edges in both
    dimensions) and split K (few output tiles, long K; dX splits too), given this GPU's SM count."""
    if not torch.cuda.is_available():
        return []
    side = 128 * int(torch.cuda.get_device_properties(0).multi_processor_count ** 0.5 + 1) + 3
    return [((side, 40), 40, side), ((64, 1100), 1100, 96), ((3, 2, 777), 777, 33)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@requires_extension()
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", _gemm_path_shapes(), ids=str)
def test_cuda_gemm_paths(dtype, transposed, shape):
    x, w, b = make(*shape, dtype=dtype, device="cuda", transposed=transposed, requires_grad=True)
    y = F.linear_act(x, w, b)
    ref = reference.linear_act(x.double(), w.double(), b.double())
    check_close(y, ref, dtype, shape[1])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    if dtype in (torch.float32, torch.float64):  # 16-bit ReLU masks of rounded outputs differ from float64's
        expected = torch.autograd.grad(ref, (x, w, b), g.double())
        for a, e in zip(got, expected):
            check_close(a, e, dtype, max(shape[1], y.numel() // y.shape[-1]))
    again = torch.autograd.grad(F.linear_act(x, w, b), (x, w, b), g)
    for a, c in zip(got, again):  # split-K sums are added in a fixed order
        assert torch.equal(a, c)


def _huge_case(shape, k, n, dtype, transposed, bias, seed=0):
    """Inputs around 1.8e19 (products near the float32 maximum): many sums overflow, some cancel."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.8e19).to(dtype)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.8e19
    w = (w.t() if transposed else w.t().contiguous()).to(dtype)
    b = (torch.randn(n, generator=g, dtype=torch.float64) * 1.8e19).to(dtype) if bias else None
    return x, w, b


def check_huge(y, x, w, b, act):
    """y against act(x @ w + b) in float64: NaN only where it is NaN; ±inf where it rounds to ±inf in y's
    dtype; elsewhere finite and close (ReLU's zeros exactly)."""
    ref = x.double() @ w.double() + (b.double() if b is not None else 0)
    ref = apply_activation(act, ref)
    assert not (y.isnan() & ~ref.isnan()).any(), f"{int((y.isnan() & ~ref.isnan()).sum())} NaN"
    rounded = ref.to(y.dtype)
    over = torch.isinf(rounded)
    assert torch.equal(y[over], rounded[over])
    fin = torch.isfinite(rounded)
    assert torch.isfinite(y[fin]).all()
    if act == "relu":
        assert torch.equal(y[rounded == 0], rounded[rounded == 0])
    if fin.any():
        check_close(y[fin], ref[fin], y.dtype, x.shape[-1])


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# The issue's (33, 65) -> 9, then the narrow-output kernel's edges: one output, 16 outputs, longest rows;
# then small weights (sequential sums that may overflow on the way, a -inf that ReLU would turn into 0).
@pytest.mark.parametrize("shape", [((33, 65), 65, 9), ((3, 43, 32), 32, 1), ((130, 100), 100, 16),
                                   ((5, 8192), 8192, 3), ((200, 20), 20, 9), ((7, 5), 5, 3), ((70, 64), 64, 40)],
                         ids=str)
def test_huge_inputs_no_nan_where_exact_has_none(act, transposed, bias, dtype, shape):
    """Vector lanes of one dot product can overflow to +inf and -inf (inf + -inf = NaN), a sequential sum to
    ±inf, where the exact sum is finite, the other infinity, or 0 after ReLU: such outputs are recomputed in
    double. As an nn.Linear weight (weight_t=True) too."""
    x, w, b = _huge_case(*shape, dtype, transposed, bias)
    y = F.linear_act(x, w, b, act)
    check_huge(y, x, w, b, act)
    weight = w.t().contiguous() if not transposed else w.t()
    yt = F.linear_act(x, weight, b, act, weight_t=True)
    check_huge(yt, x, w, b, act)
    assert torch.equal(yt, F.linear_act(x, weight.t(), b, act))


def test_huge_inputs_issue_reproducer():
    """The issue's shape: |values| in [1.7e19, 1.9e19] (no single product overflows float32), x (33, 65),
    9 outputs: every output was NaN (the exact ones: finite, ±inf, or 0 after ReLU); now none is."""
    g = torch.Generator().manual_seed(1)
    def huge(*size):
        sign = torch.randint(0, 2, size, generator=g) * 2 - 1
        return sign * (1.7e19 + 2e18 * torch.rand(size, generator=g))
    x, w, b = huge(33, 65), huge(65, 9), huge(9)
    for weight, weight_t in ((w, False), (w.t().contiguous(), True)):
        ours = F.linear_act(x, weight, b, "relu", weight_t=weight_t)
        assert not ours.isnan().any()
        check_huge(ours, x, w, b, "relu")


@pytest.mark.parametrize("act", OUTPUT_SAVING)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Narrow outputs and small weights, with rows past one 64-row chunk (dW's chunk partials then meet).
@pytest.mark.parametrize("shape", [((130, 100), 100, 16), ((200, 20), 20, 9), ((300, 40), 40, 3)], ids=str)
def test_huge_inputs_backward_no_nan_where_exact_has_none(act, transposed, dtype, shape):
    """Huge inputs and gradients: dW's partial sums may reach +inf and -inf (once NaN where float64 is finite
    or ±inf), dX's sums ±inf on the way; such entries are recomputed in double. No gradient is NaN where
    float64's is not, the infinities are float64's rounded, the rest close."""
    x, w, b = _huge_case(*shape, dtype, transposed, True)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    g = (torch.randn(*shape[0][:-1], shape[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
         * 1.8e19).to(dtype)
    ours = torch.autograd.grad(F.linear_act(x, w, b, act), (x, w, b), g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(reference.linear_act(xd, wd, bd, act), (xd, wd, bd), g.double())
    for o, r in zip(ours, ref):
        assert not (o.isnan() & ~r.isnan()).any(), f"{int((o.isnan() & ~r.isnan()).sum())} NaN"
    for o, r, k in zip(ours, ref, (shape[2], shape[0][0], shape[0][0])):
        rounded = r.to(dtype).double()
        fin = rounded.isfinite()
        assert torch.equal(o.double()[~fin], rounded[~fin])  # the same infinities
        check_close(o[fin], r[fin], dtype, k)


@requires_extension()
def test_grad_fn_prints_a_whole_name():
    # torch prints a C++ node from the last "::" of its name: ours are at global scope for that.
    y = customlayers.nn.LinearReLU(3, 2)(torch.randn(4, 3))
    assert "grad_fn=<CppNode<CustomlayersLinearActBackward>>" in repr(y)
    assert repr(customlayers.nn.CenteredLayer()(torch.randn(3, requires_grad=True))).endswith(
        "grad_fn=<CppNode<CustomlayersCenteredBackward>>)")


SPECIALS = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3e38, -3e38, 12.0, -12.0]


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_t", [False, True])
# The small-weight kernel, the narrow-output kernel (32 <= in, out <= 16) and BLAS.
@pytest.mark.parametrize("shape", [((7, 20), 20, 18), ((40, 65), 65, 9), ((130, 300), 300, 45)], ids=str)
def test_special_values_like_torch(act, dtype, weight_t, shape):
    """±inf, NaN, ±0 and huge pre-activations (the bias carries them: x @ w stays small) through each
    activation, forward and backward: NaN and ±inf exactly where torch's own function in the same dtype
    (on nn.Linear's output) has them, the rest close."""
    (rows, k), _, n = shape
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, k, generator=g, dtype=torch.float64) / k).to(dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g, dtype=torch.float64) / k).to(dtype).requires_grad_()
    b = torch.tensor((SPECIALS * n)[:n], dtype=torch.float64).to(dtype).requires_grad_()
    grad = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    ours_y = F.linear_act(x, w if weight_t else w.t(), b, act, weight_t=weight_t)
    ours = (ours_y, *torch.autograd.grad(ours_y, (x, w, b), grad))
    native_y = apply_activation(act, torch.nn.functional.linear(x, w, b))
    native = (native_y, *torch.autograd.grad(native_y, (x, w, b), grad))
    for name, o, e in zip(("y", "dx", "dw", "db"), ours, native):
        assert torch.equal(o.isnan(), e.isnan()), f"{name}: NaN at {o.isnan().nonzero().tolist()[:4]}, " \
                                                  f"torch's at {e.isnan().nonzero().tolist()[:4]}"
        special = e.isinf()
        assert torch.equal(o[special], e[special]), f"{name}: ±inf differ"
        finite = e.isfinite()
        check_close(o[finite], e[finite].double(), dtype, k if name in ("y", "dx") else rows)
