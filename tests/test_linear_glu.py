"""customlayers.linear_glu / GatedMLP: the gated linear unit against the float64 reference, forward and
backward, every activation, dtype and layout; accuracy like native's in 16 bits; gradients of first and
second order; thread-count independence; torch.func; compile; the module and a LLaMA MLP's state_dict
(opcheck and the errors of every implementation: tests/test_ops.py, tests/test_errors.py)."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from benchmarks.bench_mlp import LlamaMLP
from customlayers import functional as F
from customlayers import reference
from customlayers._activations import NAMES as ACTIVATIONS
from customlayers._activations import apply as apply_activation
from customlayers.nn import GatedMLP
from conftest import (BLAS16_MODES, BLAS32_MODES, DEVICES, FLOAT_DTYPES, assert_compiled_matches_eager,
                      requires_extension, run_16bit_checks, run_float32_checks)

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GLU_ACTS = ["silu", "gelu", "gelu_tanh", "relu"]

# (x's shape, in, hidden): tiny, odd, 3-D, BLAS-sized with row and column tiles, zero sizes.
SHAPES = [((1, 1), 1, 1), ((7, 5), 5, 3), ((2, 3, 20), 20, 9), ((5,), 5, 4), ((130, 65), 65, 70),
          ((600, 64), 64, 300), ((70, 300), 300, 1041), ((0, 4), 4, 3), ((3, 0), 0, 5), ((3, 4), 4, 0)]


def make(shape, k, n, dtype=torch.float64, device="cpu", weight_t=False, bias=True, requires_grad=False):
    """x, weight_gate, weight_up, bias_gate, bias_up; the weights (in, hidden), or (hidden, in) with weight_t."""
    def weight():
        return torch.randn((n, k) if weight_t else (k, n), dtype=dtype, device=device) / max(k, 1) ** 0.5
    tensors = [torch.randn(shape, dtype=dtype, device=device), weight(), weight(),
               torch.randn(n, dtype=dtype, device=device) if bias else None,
               torch.randn(n, dtype=dtype, device=device) if bias else None]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_()
    return tensors


def doubled(tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def check_close(y, expected, dtype, k):
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    tol = TOL[dtype] * max(1.0, k ** 0.5)
    torch.testing.assert_close(y.double(), expected.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("weight_t", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(device, dtype, act, weight_t, shape):
    inputs = make(*shape, dtype=dtype, device=device, weight_t=weight_t)
    with torch.no_grad():  # the fused kernel
        y = F.linear_glu(*inputs, act, weight_t)
    assert y.shape == (*shape[0][:-1], shape[2]) and y.dtype == dtype and y.device.type == device
    check_close(y, reference.linear_glu(*doubled(inputs), act, weight_t), dtype, shape[1])
    nobias = inputs[:3] + [None, None]
    with torch.no_grad():
        check_close(F.linear_glu(*nobias, act, weight_t), reference.linear_glu(*doubled(nobias), act, weight_t),
                    dtype, shape[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("weight_t", [False, True])
@pytest.mark.parametrize("shape", [((7, 5), 5, 3), ((2, 3, 20), 20, 9), ((600, 64), 64, 300),
                                   ((70, 300), 300, 1041), ((0, 4), 4, 3), ((3, 0), 0, 5)], ids=str)
def test_backward_matches_reference(device, dtype, act, weight_t, shape):
    inputs = make(*shape, dtype=dtype, device=device, weight_t=weight_t, requires_grad=True)
    y = F.linear_glu(*inputs, act, weight_t)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, inputs, g)
    ref_inputs = doubled(inputs)
    ref = torch.autograd.grad(reference.linear_glu(*ref_inputs, act, weight_t), ref_inputs, g.double())
    rows = max(1, shape[0][0] if len(shape[0]) > 1 else 1)
    for o, r, k in zip(ours, ref, (shape[2], rows, rows, rows, rows)):
        assert o.dtype == dtype and o.shape == r.shape
        check_close(o, r, dtype, k)
    # The weights' gradients come in their layouts (nn.Linear's (hidden, in) contiguous with weight_t).
    assert ours[1].stride() == inputs[1].stride() or inputs[1].numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("weight_t", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [((1, 1), 1, 1), ((7, 5), 5, 3), ((2, 3, 4), 4, 5), ((3,), 3, 2)], ids=str)
def test_gradcheck(device, act, weight_t, bias, shape):
    inputs = make(*shape, device=device, weight_t=weight_t, bias=bias, requires_grad=True)
    present = [t for t in inputs if t is not None]

    def fn(*args):
        it = iter(args)
        return F.linear_glu(*[next(it) if t is not None else None for t in inputs], act, weight_t)
    assert torch.autograd.gradcheck(fn, present) and torch.autograd.gradgradcheck(fn, present)


@pytest.mark.parametrize("device", DEVICES)
def test_only_needed_gradients(device):
    x, wg, wu, bg, bu = make((6, 5), 5, 4, device=device, requires_grad=False)
    wg.requires_grad_()
    (dwg,) = torch.autograd.grad(F.linear_glu(x, wg, wu, bg, bu).sum(), (wg,))
    xd, wgd, wud = doubled([x, wg, wu])
    (expected,) = torch.autograd.grad(reference.linear_glu(xd, wgd, wud, bg.double(), bu.double()).sum(), (wgd,))
    torch.testing.assert_close(dwg, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", GLU_ACTS)
def test_views_and_special_values(device, act):
    """x and weights as views of any strides; NaN and inf where torch's functions give them."""
    base = torch.randn(9, 40, device=device)
    x = base[::2, 3:23]  # (5, 20), row stride 80
    wg = torch.randn(30, 20, device=device)[::2].t()  # (20, 15), strided
    wu = torch.randn(15, 20, device=device).t()
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -float("inf")
    with torch.no_grad():
        y = F.linear_glu(x, wg, wu, act=act)
    expected = apply_activation(act, x.double() @ wg.double()) * (x.double() @ wu.double())
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4, equal_nan=True)
    xr = x.detach().requires_grad_()
    grads = torch.autograd.grad(F.linear_glu(xr, wg, wu, act=act).sum(), (xr,))
    xd = x.detach().double().requires_grad_()
    native = torch.autograd.grad(reference.linear_glu(xd, wg.double(), wu.double(), act=act).sum(), (xd,))
    assert torch.equal(grads[0].isnan(), native[0].isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weights_in_different_layouts(device, dtype):
    """One weight row-major, the other column-major (or strided): the kernels take them as given or copy one,
    forward and backward, and agree with the reference."""
    torch.manual_seed(0)
    x, b = torch.randn(33, 20, dtype=dtype, device=device), torch.randn(2, 15, dtype=dtype, device=device)
    row_major, col_major = torch.randn(20, 15, dtype=dtype, device=device), torch.randn(15, 20, dtype=dtype, device=device).t()
    strided = torch.randn(20, 30, dtype=dtype, device=device)[:, ::2]
    for wg, wu in [(row_major, col_major), (col_major, row_major), (strided, col_major)]:
        inputs = [t.detach().requires_grad_() for t in (x, wg, wu, b[0], b[1])]
        y = F.linear_glu(*inputs)
        with torch.no_grad():
            fused = F.linear_glu(*inputs)
        expected = reference.linear_glu(*(t.detach().double().requires_grad_() for t in inputs))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(y.double(), expected.double(), **tol)
        torch.testing.assert_close(fused, y, rtol=0, atol=0)
        g = torch.randn_like(y)
        ours = torch.autograd.grad(y, inputs, g)
        leaves = [t.detach().double().requires_grad_() for t in inputs]
        native = torch.autograd.grad(reference.linear_glu(*leaves), leaves, g.double())
        for a, e in zip(ours, native):
            torch.testing.assert_close(a.double(), e, **tol)


def _accuracy_errors(dtype, shape, act, bias, weight_t, seed):
    """Errors of y (the fused forward), dx, dWg, dWu, dbg, dbu against float64 (max abs error / max abs value):
    ours, and the native gated MLP half act(F.linear(x, Wg, bg)) * F.linear(x, Wu, bu) in the same dtype."""
    m, k, n = shape
    torch.manual_seed(sum(shape) + 1000 * seed)
    x = torch.randn(m, k, dtype=dtype)
    wg, wu = ((torch.randn(n, k) / k ** 0.5).to(dtype) for _ in range(2))  # nn.Linear's (hidden, in)
    bg, bu = ((torch.randn(n) if bias else torch.zeros(n)).to(dtype) for _ in range(2))
    g = torch.randn(m, n, dtype=dtype)

    def run(fn, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        y = fn(*inputs)
        return [y, *torch.autograd.grad(y, inputs, g.to(y.dtype))]

    def native(x, wg, wu, bg, bu):
        return apply_activation(act, nn.functional.linear(x, wg, bg)) * nn.functional.linear(x, wu, bu)

    def ours(x, wg, wu, bg, bu):
        if weight_t:
            return F.linear_glu(x, wg, wu, bg, bu, act, True)
        return F.linear_glu(x, wg.t(), wu.t(), bg, bu, act)

    truth = run(native, x.double(), wg.double(), wu.double(), bg.double(), bu.double())

    def errors(values):
        return [((v.double() - t).abs().max() / t.abs().max().clamp_min(1e-30)).item() for v, t in zip(values, truth)]
    with torch.no_grad():
        fused = ours(x, wg, wu, bg, bu)
    return errors([fused, *run(ours, x, wg, wu, bg, bu)[1:]]), errors(run(native, x, wg, wu, bg, bu))


SEEDS = 3


def check_accuracy_like_native(dtypes=(torch.float16, torch.bfloat16), shapes=((64, 20, 48), (75, 131, 45), (256, 300, 130))):
    """16-bit outputs and gradients round once from float32 sums (or, where 16-bit GEMMs run, from the
    gated gradients rounded once): errors, averaged over SEEDS inputs (the largest error of one small case
    varies by 2x from seed to seed), at most 1.5x the native gated MLP half's (plus 1% of the dtype's
    epsilon). Raises AssertionError listing the failures."""
    failures = []
    for dtype in dtypes:
        eps = torch.finfo(dtype).eps
        for shape in shapes:
            for act in GLU_ACTS:
                for bias in (True, False):
                    for weight_t in (True, False):
                        runs = [_accuracy_errors(dtype, shape, act, bias, weight_t, seed) for seed in range(SEEDS)]
                        ours, native = ([sum(r[i][j] for r in runs) / SEEDS for j in range(6)] for i in (0, 1))
                        for name, o, r in zip(("y", "dx", "dWg", "dWu", "dbg", "dbu"), ours, native):
                            if o > 1.5 * r + 0.01 * eps:
                                failures.append(f"{dtype} {shape} {act} bias={bias} weight_t={weight_t} {name}: "
                                                f"ours {o:.3g} vs native {r:.3g}")
    assert not failures, "\n".join(failures)


def check_bf16_views_and_specials():
    """The bfloat16 forward on x views and strided weights, odd and tile-edge sizes, NaN and inf: close to
    the float64 result rounded to bfloat16, NaN where it is NaN."""
    for m, k, n in [(75, 131, 45), (21, 130, 90), (9, 1, 17), (8, 64, 16)]:
        base = torch.randn(m, 2 * k + 3, dtype=torch.bfloat16)
        x = base[:, 3:3 + 2 * k:2]  # column stride 2
        wg = torch.randn(n, k, dtype=torch.bfloat16) / k ** 0.5
        wu = torch.randn(k, n + 5, dtype=torch.bfloat16)[:, 2:2 + n] / k ** 0.5  # (in, hidden), strided
        bg, bu = torch.randn(n, dtype=torch.bfloat16), torch.randn(n, dtype=torch.bfloat16)
        x[0, 0], x[min(1, m - 1), k - 1] = float("nan"), float("inf")
        for act in GLU_ACTS:
            with torch.no_grad():
                y = F.linear_glu(x, wg.t(), wu, bg, bu, act)
            truth = reference.linear_glu(x.double(), wg.t().double(), wu.double(), bg.double(), bu.double(), act)
            assert torch.equal(y.isnan(), truth.to(torch.bfloat16).isnan()), (m, k, n, act)
            finite = truth.isfinite()
            err = (y.double() - truth)[finite].abs()
            assert (err <= 2 ** -7 * truth[finite].abs() + 1e-2).all(), (m, k, n, act, err.max())




def check_float32_like_native():
    """float32, whichever GEMM runs it (CUSTOMLAYERS_CPU_BLAS32): errors of the output and every gradient at
    most 1.5x the native gated MLP half's, at sizes past gemm_f32's blocks (K over several reduction slices,
    more hidden columns than one block, tails); views and NaN/inf (test_views_and_special_values); the same
    bits on 1, 2 and 3 threads. Raises AssertionError listing failures."""
    check_accuracy_like_native((torch.float32,), ((75, 131, 45), (33, 600, 1100), (256, 300, 130)))
    for act in GLU_ACTS:
        test_views_and_special_values("cpu", act)
    _check_same_bits_on_any_thread_count(torch.float32, (700, 300, 260), "silu")


@requires_extension()
@pytest.mark.parametrize("blas32", BLAS32_MODES)
def test_float32_blas_paths(blas32):
    """check_float32_like_native, and check_accuracy_like_native with the 16-bit GEMMs in float32, with each
    float32 GEMM forced (CUSTOMLAYERS_CPU_BLAS32): BLAS's ('native') and gemm_f32.h's ('own')."""
    run_float32_checks("test_linear_glu", blas32)


@requires_extension()
@pytest.mark.parametrize("blas16", BLAS16_MODES)
def test_reduced_precision_accuracy_like_native(blas16):
    """check_accuracy_like_native and check_bf16_views_and_specials with each way of running 16-bit GEMMs
    forced (CUSTOMLAYERS_CPU_BLAS16): 'native' and 'float' on any CPU; 'dot' and 'amx' (the AVX512-BF16 and
    AMX forwards) where the CPU has them."""
    run_16bit_checks("test_linear_glu", blas16)


@requires_extension()
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(3000, 17, 33), (64, 1024, 700), (700, 300, 260)], ids=str)
@pytest.mark.parametrize("act", GLU_ACTS)
def test_cpu_results_independent_of_thread_count(dtype, shape, act):
    _check_same_bits_on_any_thread_count(dtype, shape, act)


def _check_same_bits_on_any_thread_count(dtype, shape, act):
    m, k, n = shape
    inputs = make((m, k), k, n, dtype=dtype, weight_t=True, requires_grad=True)
    g = torch.randn(m, n, dtype=dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = F.linear_glu(*inputs, act, True)
            with torch.no_grad():
                fused = F.linear_glu(*inputs, act, True)
            results.append((y, fused, *torch.autograd.grad(y, inputs, g)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, o in zip(results[0], other):
            assert torch.equal(a, o)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func(device):
    """grad, jacrev, jacfwd and vmap (per-sample gradients) take linear_glu as they take native code."""
    x, wg, wu, bg, bu = make((4, 5), 5, 3, device=device)

    def ours(wg, x):
        return F.linear_glu(x, wg, wu, bg, bu, "silu").square().sum()

    def native(wg, x):
        return reference.linear_glu(x, wg, wu, bg, bu, "silu").square().sum()
    torch.testing.assert_close(torch.func.grad(ours)(wg, x), torch.func.grad(native)(wg, x))
    torch.testing.assert_close(torch.func.jacrev(ours)(wg, x), torch.func.jacrev(native)(wg, x))
    torch.testing.assert_close(torch.func.jacfwd(ours)(wg, x), torch.func.jacfwd(native)(wg, x))
    per_sample = torch.func.vmap(torch.func.grad(ours), in_dims=(None, 0))(wg, x.unsqueeze(1))
    expected = torch.func.vmap(torch.func.grad(native), in_dims=(None, 0))(wg, x.unsqueeze(1))
    torch.testing.assert_close(per_sample, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(device, dtype):
    if device == "cpu" and dtype == torch.float16 and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no float16 autocast on CPU in this torch")
    x, wg, wu, bg, bu = make((6, 8), 8, 5, dtype=torch.float32, device=device, weight_t=True, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        y = F.linear_glu(x, wg, wu, bg, bu, "silu", True)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert wg.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", GLU_ACTS)
def test_gated_mlp_matches_native_and_loads_llama_state_dict(device, activation):
    native = LlamaMLP(64, 96).to(device)
    if activation != "silu":
        native.act_fn = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[activation]
    ours = GatedMLP(64, 96, activation=activation, device=device)
    ours.load_state_dict(native.state_dict())
    assert ours.state_dict().keys() == native.state_dict().keys()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 64, device=device)
    torch.testing.assert_close(ours(x), native(x))
    ours(x).square().sum().backward()
    native(x).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), native.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_gated_mlp_arguments():
    m = GatedMLP(8, 16, 4, bias=True, activation="gelu")
    assert (m.gate_proj.weight.shape, m.down_proj.weight.shape, m.down_proj.bias.shape) == ((16, 8), (4, 16), (4,))
    assert "activation='gelu'" in repr(m)
    with pytest.raises(ValueError, match="GatedMLP: activation must be one of"):
        GatedMLP(8, 16, activation="swish")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    model = GatedMLP(8, 16, bias=True).to(device)
    assert_compiled_matches_eager(model, torch.randn(5, 8, device=device))


def test_torchscript():
    model = GatedMLP(8, 16)
    scripted = torch.jit.script(model)
    x = torch.randn(3, 8)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_example_runs(dtype):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "llama_mlp.py"), "--dtype", dtype],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "outputs match the native layer" in out.stdout and "linear_glu: mlp.gate_proj * mlp.up_proj" in out.stderr
