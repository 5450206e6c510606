"""Property-based tests (hypothesis): every op on random shapes (sizes 0 and 1 included), layouts
(transposed, sliced, expanded, offset, channels-last, permuted), dtypes, values (NaN, +-inf, subnormals,
near-maximum) and options, forward and backward, against the pure-PyTorch reference (the fallback), plain
PyTorch and float64; invalid options raise the same exception type on the kernel and reference paths.

Profiles (tests/conftest.py): `ci` by default (derandomized: the same examples every run), `long` with
HYPOTHESIS_PROFILE=long (make test-long). Known differences from PyTorch are kept out of the general
properties by restricting their values, each next to a comment naming the test that isolates it."""
import math

import pytest
import torch
import torch.nn.functional as TF

import customlayers
from customlayers import functional as F
from customlayers import init, reference
from customlayers._activations import apply as apply_activation
from customlayers.nn import CenteredLayer, LinearReLU, MyLinear
from conftest import FLOAT_DTYPES

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import assume, given, note, strategies as st  # noqa: E402

if not customlayers._ops.loaded():
    pytest.skip("the properties compare the compiled kernels with the reference, and the compiled extension is "
                f"not in use: {customlayers._ops.reason()}", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")
OPS = torch.ops.customlayers
SPECIALS = ("nan", "inf", "-inf", "subnormal", "near_max")
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "offset", "channels_last", "permuted")
WRITABLE_LAYOUTS = tuple(layout for layout in LAYOUTS if layout != "expanded")
# centered: absolute error allowed relative to the largest finite |x| (as tests/test_centered.py).
CENTERED_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ------------------------------------------------------------------------------------------ strategies

def shapes(max_dims=4, max_side=5):
    return st.lists(st.integers(0, max_side), max_size=max_dims).map(tuple)


@st.composite
def values(draw, shape, dtype, specials=SPECIALS, scales=(1.0, 1e-3, 1e3), near_max=1 / 128):
    """Values of `shape` in `dtype`, contiguous: normal ones at a drawn scale, up to 3 replaced by special
    values; a near-maximum one is +-near_max * the dtype's largest, a subnormal +-tiny / 4."""
    numel = math.prod(shape)
    seed = draw(st.integers(0, 2 ** 32 - 1))
    v = torch.randn(numel, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    v *= draw(st.sampled_from(scales))
    info = torch.finfo(dtype)
    special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "subnormal": info.tiny / 4,
               "near_max": info.max * near_max}
    if numel and specials:
        for index, kind, sign in draw(st.lists(st.tuples(st.integers(0, numel - 1), st.sampled_from(specials),
                                                         st.sampled_from([1.0, -1.0])), max_size=3)):
            v[index] = sign * special[kind]
    return v.reshape(shape).to(dtype)


@st.composite
def layouts(draw, v, allowed=LAYOUTS):
    """v's values in a drawn memory layout (where v's shape allows it). 'expanded' broadcasts v's first
    row: other values, so callers take the returned tensor as the input."""
    layout = draw(st.sampled_from(allowed))
    if layout == "transposed" and v.dim() >= 2:
        return v.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and v.dim() >= 1:
        big = torch.zeros(*v.shape[:-1], 2 * v.shape[-1] + 1, dtype=v.dtype)
        big[..., 1::2] = v
        return big[..., 1::2]
    if layout == "expanded" and v.dim() >= 1 and v.shape[0] > 1:
        return v[:1].expand(v.shape)
    if layout == "offset":
        flat = torch.zeros(v.numel() + 3, dtype=v.dtype)
        flat[3:] = v.flatten()
        return flat[3:].view(v.shape)
    if layout == "channels_last" and v.dim() == 4:
        return v.contiguous(memory_format=torch.channels_last)
    if layout == "permuted" and v.dim() >= 2:
        perm = draw(st.permutations(range(v.dim())))
        inverse = sorted(range(v.dim()), key=perm.__getitem__)
        return v.permute(perm).contiguous().permute(inverse)
    return v


@st.composite
def tensors(draw, shape, dtype, allowed=LAYOUTS, **kwargs):
    t = draw(layouts(draw(values(shape, dtype, **kwargs)), allowed))
    note(f"{dtype} shape {tuple(t.shape)} strides {t.stride()} offset {t.storage_offset()}: {t}")
    return t


def _where(differs, y, expected):
    """The first few positions where `differs`, with both values: a short failure message."""
    at = differs.nonzero()[:4].tolist()
    return ", ".join(f"{tuple(i)}: {y[tuple(i)].item()} vs {expected[tuple(i)].item()}" for i in at)


def assert_close_to(y, expected, bound):
    """NaN where `expected` (float64) is NaN, the same infinities, and |y - expected| <= bound elsewhere
    (bound: a number or a tensor of expected's shape)."""
    y, expected = y.double(), expected.double()
    assert y.shape == expected.shape
    nan = y.isnan() != expected.isnan()
    assert not nan.any(), f"NaN positions differ (got vs expected) at {_where(nan, y, expected)}"
    inf = (y.isinf() | expected.isinf()) & (y != expected)
    assert not inf.any(), f"infinities differ at {_where(inf, y, expected)}"
    bound = torch.as_tensor(bound, dtype=torch.float64).expand(expected.shape)
    above = expected.isfinite() & ((y - expected).abs() > bound)
    assert not above.any(), f"error above the bound at {_where(above, y, expected)}"


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def raised(fn):
    """The exception type fn() raises, or None."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (the type is the result)
        return type(exc)
    return None


# ------------------------------------------------------------------------------------------ centered

@st.composite
def dims(draw, ndim):
    """A valid dim: None, [], an int (negative too) or a list of distinct dims, some negative."""
    n = max(ndim, 1)  # a 0-d tensor takes dim 0 and -1
    kind = draw(st.sampled_from(["none", "empty", "int", "list"]))
    if kind == "none":
        return None
    if kind == "empty":
        return []
    if kind == "int":
        return draw(st.integers(-n, n - 1))
    picked = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    return [d - n if draw(st.booleans()) else d for d in picked]


def op_dims(dim):
    return [dim] if isinstance(dim, int) else dim


def centered_truth(x, dim):
    """x - x.mean(dim, keepdim=True) in float64."""
    xd = x.detach().double()
    if not dim and dim != 0:
        return xd - xd.mean()
    return xd - xd.mean(dim=tuple(op_dims(dim)), keepdim=True)


# Near-maximum values are max/(128 * 5**4) here (at most 5**4 elements): no sum of them overflows in x's
# dtype, as the reference's x.mean() (PyTorch's) sums. The kernels with larger ones:
# test_centered_near_max_does_not_overflow.
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_centered_forward(data, dtype):
    x = data.draw(tensors(data.draw(shapes(), "shape"), dtype, near_max=1 / (128 * 5 ** 4)), "x")
    dim = data.draw(dims(x.dim()), "dim")
    y = F.centered(x, dim)
    assert y.shape == x.shape and y.dtype == dtype
    assert_identical(OPS.centered(x, op_dims(dim)), y)
    assert_identical(CenteredLayer(dim)(x), y)
    finite = x[x.isfinite()].double()
    bound = CENTERED_TOL[dtype] * max(finite.abs().max().item() if finite.numel() else 0.0, 1.0)
    truth = centered_truth(x, dim)
    assert_close_to(y, truth, bound)
    # The reference (the fallback) is plain PyTorch, x - x.mean(dim, keepdim=True), in x's dtype.
    ref = reference.centered(x, op_dims(dim))
    assert_close_to(ref, truth, bound)


@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_centered_backward(data, dtype):
    shape = data.draw(shapes(), "shape")
    x = data.draw(tensors(shape, dtype), "x").detach().requires_grad_()
    dim = data.draw(dims(x.dim()), "dim")
    g = data.draw(values(shape, dtype, specials=(), scales=(1.0,)), "grad")
    (dx,) = torch.autograd.grad(F.centered(x, dim), x, g)
    (ref,) = torch.autograd.grad(reference.centered(x, op_dims(dim)), x, g)
    assert dx.dtype == dtype
    bound = CENTERED_TOL[dtype] * max(g.abs().max().item() if g.numel() else 0.0, 1.0)
    assert_close_to(dx, centered_truth(g, dim), bound)
    assert_close_to(ref, centered_truth(g, dim), bound)


@st.composite
def bad_dims(draw, ndim):
    n = max(ndim, 1)
    kind = draw(st.sampled_from(["above", "below", "repeated", "repeated_negative"]))
    if kind == "above":
        return [draw(st.integers(n, n + 3))]
    if kind == "below":
        return [draw(st.integers(-n - 3, -n - 1))]
    d = draw(st.integers(0, n - 1))
    return [d, d] if kind == "repeated" else [d, d - n]


@given(data=st.data())
def test_centered_errors_match_reference(data):
    shape = data.draw(shapes(), "shape")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES + [torch.int64, torch.bool]), "dtype")
    dim = data.draw(bad_dims(len(shape)) if dtype.is_floating_point else st.none() | bad_dims(len(shape)), "dim")
    x = torch.zeros(shape, dtype=dtype)
    expected = raised(lambda: reference.centered(x, dim))
    assert expected is not None
    assert raised(lambda: OPS.centered(x, dim)) is expected
    assert raised(lambda: F.centered(x, dim)) is expected


def test_centered_near_max_does_not_overflow():
    x = torch.full((1000,), 1e37)
    assert_close_to(F.centered(x), torch.zeros(1000, dtype=torch.float64), CENTERED_TOL[torch.float32] * 1e37)


# The CPU kernels sum in double: a constant tensor's sum is exact (for float64 too when the value times the
# count needs no more bits: small integers times powers of two here), its mean is the value, the output 0.
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_centered_constant_gives_exact_zero(data, dtype):
    shape = data.draw(shapes(max_dims=3, max_side=40), "shape")  # up to 64,000 elements
    info = torch.finfo(dtype)
    if dtype == torch.float64:
        value = data.draw(st.integers(-2 ** 20, 2 ** 20), "m") * 2.0 ** data.draw(st.integers(-60, 60), "e")
    else:
        value = data.draw(st.sampled_from([1e-3, -3.3, 0.1, -1 / 3, 1e38, -65504.0]).map(lambda v: max(-info.max, min(info.max, v)))
                          | st.floats(-info.max, info.max, allow_nan=False, allow_infinity=False), "value")
    v = torch.full(shape, value, dtype=torch.float64).to(dtype)
    x = data.draw(layouts(v), "x")
    dim = data.draw(dims(x.dim()), "dim")
    note(f"{dtype} {value} shape {tuple(x.shape)} strides {x.stride()} dim {dim}")
    y = F.centered(x, dim)
    assert torch.equal(y, torch.zeros_like(y)), y.abs().max()


def test_centered_scalar_repeated_dim():
    x = torch.tensor(1.0)
    expected = raised(lambda: reference.centered(x, [0, 0]))
    assert expected is RuntimeError
    assert raised(lambda: OPS.centered(x, [0, 0])) is expected


# ------------------------------------------------------------------------------------------ linear_act

@st.composite
def linear_inputs(draw, dtype, specials=SPECIALS):
    """x (*, k), weight (k, n), bias (n,) or None, in drawn layouts. The magnitudes keep every product
    and sum (forward and backward, at most 27 rows) finite: x up to ~10 (near-maximum: max/1024, in x
    only), weight and bias up to ~5, the gradient up to ~5."""
    lead = draw(shapes(max_dims=3, max_side=3), "lead")
    k, n = draw(st.integers(0, 6), "k"), draw(st.integers(0, 6), "n")
    x = draw(tensors((*lead, k), dtype, specials=specials, scales=(1.0, 1e-3, 3.0), near_max=1 / 1024), "x")
    small = tuple(s for s in specials if s != "near_max")
    w = draw(tensors((k, n), dtype, allowed=("contiguous", "transposed", "sliced", "expanded", "offset"),
                     specials=small, scales=(1.0, 1e-3)), "weight")
    b = draw(st.none() | tensors((n,), dtype, allowed=("contiguous", "sliced", "expanded", "offset"),
                                 specials=small, scales=(1.0, 1e-3)), "bias")
    return x, w, b


def gemm_bound(abs_sum, terms, dtype):
    """What a sum of `terms` products may be off by in `dtype` (accumulated in dtype or wider), from the
    sum of the products' magnitudes."""
    info = torch.finfo(dtype)
    return (terms + 2) * (info.eps * abs_sum + info.tiny)


def linear_truth(x, w, b, act):
    xd, wd = x.double(), w.double()
    y = xd @ wd + (b.double() if b is not None else 0.0)
    bound = xd.abs() @ wd.abs() + (b.double().abs() if b is not None else 0.0)
    return (torch.relu(y) if act == "relu" else y), bound


@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES), act=st.sampled_from(["relu", "none"]))
def test_linear_act_forward(data, dtype, act):
    x, w, b = data.draw(linear_inputs(dtype))
    k, n = w.shape
    y = F.linear_act(x, w, b, act)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype
    assert_identical(OPS.linear_act(x, w, b, act), y)
    truth, abs_sum = linear_truth(x, w, b, act)
    bound = gemm_bound(abs_sum, k, dtype)
    assert_close_to(y, truth, bound)
    assert_close_to(reference.linear_act(x, w, b, act), truth, bound)     # the fallback
    plain = TF.linear(x, w.t(), b)                                          # plain PyTorch
    assert_close_to(torch.relu(plain) if act == "relu" else plain, truth, bound)
    module = MyLinear(k, n, bias=b is not None, activation=act, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        if b is not None:
            module.bias.copy_(b)
    assert_close_to(module(x), truth, bound)
    if act == "relu":
        module = LinearReLU(k, n, bias=b is not None, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(w.t())
            if b is not None:
                module.bias.copy_(b)
        assert_close_to(module(x), truth, bound)


# (rows, in, out) ranges of each CPU path: small weights (in <= 64), narrow outputs (out <= 16, in >= 32)
# and BLAS GEMMs (the rest).
PATH_SIZES = {"small": ((1, 70), (1, 64), (17, 40)), "narrow": ((1, 70), (32, 300), (1, 16)),
              "blas": ((1, 140), (65, 200), (17, 80))}


@given(data=st.data(), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       path=st.sampled_from(sorted(PATH_SIZES)), act=st.sampled_from(["relu", "none"]), weight_t=st.booleans())
def test_linear_act_reduced_precision_with_bias_rounds_once(data, dtype, path, act, weight_t):
    """float16/bfloat16 with a bias on every CPU path: each output is the float32-accumulated value rounded
    once to the dtype (bias and activation on the accumulator), so it is within the float32 accumulation
    error plus half an ulp of the dtype of the exact value; rounding the product before adding the bias
    is off by half an ulp of the product, which a bias of the opposite sign makes far larger (and it can
    flip the ReLU)."""
    m, k, n = (data.draw(st.integers(lo, hi), name) for (lo, hi), name in zip(PATH_SIZES[path], "mkn"))
    seed = data.draw(st.integers(0, 2 ** 31 - 1), "seed")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)   # nn.Linear's (out, in)
    b = (torch.randn(n, generator=gen) * 2).to(dtype)
    y = F.linear_act(x, w if weight_t else w.t(), b, act, weight_t=weight_t)
    truth, abs_sum = linear_truth(x, w.t(), b, act)
    pre = x.double() @ w.double().t() + b.double()
    accumulation = gemm_bound(abs_sum, k, torch.float32)
    half_ulp = torch.finfo(dtype).eps / 2 * (pre.abs() + accumulation)
    assert_close_to(y, truth, accumulation + half_ulp + torch.finfo(dtype).tiny)


def gradients_truth(g1, g1_error, x, w, b):
    """(dx, dw, db) in float64 from the masked gradient g1 = g * act'(.) (float64, y's shape), with their error
    bounds in x's dtype: the GEMMs' and g1_error's (g1's own error bound, a tensor of its shape, or 0)
    carried through them."""
    (k, n), m, dtype = w.shape, math.prod(x.shape[:-1]), x.dtype
    g1_error = torch.as_tensor(g1_error, dtype=torch.float64).expand(g1.shape)
    g2, e2, x2, wd = g1.reshape(m, n), g1_error.reshape(m, n), x.double().reshape(m, k), w.double()
    truth = [(g1 @ wd.t(), gemm_bound(g1.abs() @ wd.abs().t(), n, dtype) + g1_error @ wd.abs().t()),
             (x2.t() @ g2, gemm_bound(x2.abs().t() @ g2.abs(), m, dtype) + x2.abs().t() @ e2),
             (g2.sum(0), gemm_bound(g2.abs().sum(0), m, dtype) + e2.sum(0))]
    return truth if b is not None else truth[:2]


def linear_backward_truth(g, x, w, b, y, act):
    """(dx, dw, db) and their error bounds in float64, with torch.relu's derivative: the gradient passes
    where the output is not <= 0."""
    gd = g.double()
    if act == "relu":
        gd = torch.where(y <= 0, 0.0, gd)
    return gradients_truth(gd, 0.0, x, w, b)


# With act='relu' a NaN output passes the gradient, as torch.relu's backward does (the truth's mask is
# out <= 0): test_linear_act_backward_passes_gradient_where_output_is_nan checks it bit for bit.
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES), act=st.sampled_from(["relu", "none"]))
def test_linear_act_backward(data, dtype, act):
    x, w, b = (t if t is None else t.detach().requires_grad_() for t in data.draw(linear_inputs(dtype)))
    inputs = [t for t in (x, w, b) if t is not None]
    y = F.linear_act(x, w, b, act)
    g = data.draw(values(tuple(y.shape), dtype, specials=(), scales=(1.0,)), "grad")
    grads = torch.autograd.grad(y, inputs, g)
    y = y.detach()
    truth = linear_backward_truth(g, x.detach(), w.detach(), b, y, act)
    mask = [True, True, b is not None]
    direct = OPS.linear_act_backward(g, x.detach(), w.detach(), y, act, mask)
    for ours, op_grad, (expected, bound) in zip(grads, direct, truth):
        assert ours.dtype == dtype and ours.shape == expected.shape
        assert_close_to(ours, expected, bound)
        assert_close_to(op_grad, expected, bound)
    ref = reference.linear_act_backward(g, x.detach(), w.detach(), y, act, mask)   # the fallback
    for ref_grad, (expected, bound) in zip(ref, truth):
        assert_close_to(ref_grad, expected, bound)
    if w.numel() > 1:  # the weight's gradient in the weight's layout, as the reference gives it
        assert direct[1].stride() == ref[1].stride()


# The smooth activations against float64, with error bounds from their derivatives: (max |act'|, what the
# backward reads (the pre-activation or the output), max |d act'/d saved|) — gelu'' peaks at 2 pdf(0) = 0.80,
# silu'' at 0.5; tanh' = 1 - y^2 and sigmoid' = y (1 - y) move by at most 2 and 1 per unit of y.
SMOOTH = {"gelu": (1.13, "pre", 0.8), "gelu_tanh": (1.13, "pre", 0.8), "silu": (1.1, "pre", 0.5),
          "tanh": (1.0, "output", 2.0), "sigmoid": (0.25, "output", 1.0)}


def smooth_truth(x, w, b, act):
    """act(x @ w + b) in float64, the pre-activation, and the bound of the pre-activation's error in
    x's dtype (and of the activation's: its derivative's maximum times that, plus a few ulps of the
    pre-activation's magnitude, which covers 1 + erf(v) cancelling for negative v, and one rounding)."""
    pre, abs_sum = linear_truth(x, w, b, "none")
    eps, tiny = torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny
    pre_error = gemm_bound(abs_sum, w.shape[0], x.dtype)
    y = apply_activation(act, pre)
    return y, pre, pre_error, SMOOTH[act][0] * pre_error + 8 * eps * (pre.abs() + y.abs()) + tiny


# NaN and ±inf pre-activations are left out here: float32's gelu(+inf) is NaN in torch's own vectorized
# function (and ours, as test_linear_act.py::test_special_values_like_torch checks against torch in the
# same dtype), inf in float64.
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES), act=st.sampled_from(sorted(SMOOTH)))
def test_linear_act_smooth_activations_forward(data, dtype, act):
    x, w, b = data.draw(linear_inputs(dtype, specials=("subnormal", "near_max")))
    y = F.linear_act(x, w, b, act)
    assert y.shape == (*x.shape[:-1], w.shape[1]) and y.dtype == dtype
    assert_identical(OPS.linear_act(x, w, b, act), y)
    truth, _, _, bound = smooth_truth(x, w, b, act)
    assert_close_to(y, truth, bound)
    assert_close_to(reference.linear_act(x, w, b, act), truth, bound)                 # the fallback
    assert_close_to(apply_activation(act, TF.linear(x, w.t(), b)), truth, bound)      # plain PyTorch
    module = MyLinear(w.shape[0], w.shape[1], bias=b is not None, activation=act, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        if b is not None:
            module.bias.copy_(b)
    assert_close_to(module(x), truth, bound)


# Near-maximum pre-activations are left out too: gelu_tanh's derivative squares them, which overflows in
# float32 (NaN, as torch's own backward gives; test_special_values_like_torch has 3e38).
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES), act=st.sampled_from(sorted(SMOOTH)))
def test_linear_act_smooth_activations_backward(data, dtype, act):
    x, w, b = (t if t is None else t.detach().requires_grad_()
               for t in data.draw(linear_inputs(dtype, specials=("subnormal",))))
    inputs = [t for t in (x, w, b) if t is not None]
    y = F.linear_act(x, w, b, act)
    g = data.draw(values(tuple(y.shape), dtype, specials=(), scales=(1.0,)), "grad")
    grads = torch.autograd.grad(y, inputs, g)
    truth_y, pre, pre_error, y_error = smooth_truth(x.detach(), w.detach(), b, act)
    # g' = g * act'(saved) in float64 and its error bound: the saved value's (stored in the dtype) times
    # how fast act' moves with it, plus a few ulps of evaluating act'.
    eps = torch.finfo(dtype).eps
    _, saves, slope = SMOOTH[act]
    saved = pre if saves == "pre" else truth_y
    saved_error = (pre_error if saves == "pre" else y_error) + eps * saved.abs()
    gd = g.double()
    g1 = customlayers._activations.derivative(act, gd, saved)
    g1_error = gd.abs() * (slope * saved_error + 8 * eps * (1 + pre.abs()))
    truth = gradients_truth(g1, g1_error, x.detach(), w.detach(), b)
    for ours, (expected, bound) in zip(grads, truth):
        assert ours.dtype == dtype and ours.shape == expected.shape
        assert_close_to(ours, expected, bound)
    td = [t.detach().double().requires_grad_() for t in inputs]                        # the fallback's
    ref = torch.autograd.grad(reference.linear_act(td[0], td[1], td[2] if b is not None else None, act), td, gd)
    for ref_grad, (expected, bound) in zip(ref, truth):
        assert_close_to(ref_grad, expected, bound)


@st.composite
def huge_linear_inputs(draw, dtype):
    """x (m, k), weight (k, n) or its (n, k) transpose for weight_t, bias or None, around 1.8e19: products
    near the float32 maximum, many sums overflowing and some cancelling. k and n span the small-weight
    (k <= 64) and narrow-output (n <= 16, 32 <= k) kernels."""
    m, k, n = draw(st.integers(1, 40), "m"), draw(st.integers(1, 100), "k"), draw(st.integers(1, 16), "n")
    seed = draw(st.integers(0, 2 ** 32 - 1), "seed")
    gen = torch.Generator().manual_seed(seed)
    scale = 1.8e19 * draw(st.sampled_from([0.5, 1.0, 1.05]), "scale")
    x, w, b, g = (torch.randn(size, generator=gen, dtype=torch.float64).mul(scale).to(dtype)
                  for size in ((m, k), (k, n), (n,), (m, n)))
    return x, w, (b if draw(st.booleans(), "bias") else None), g


# Huge finite inputs (1.8e19: products near the float32 maximum). Forward: NaN only where float64 is NaN
# (vector lanes overflowing to +inf and -inf once gave NaN where the exact output was finite or 0),
# the same infinities as float64 rounded to the dtype, close elsewhere. Backward: dW and the bias gradient
# never NaN where float64 is not (dW's partial sums once met as inf + -inf); dX neither.
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       act=st.sampled_from(["relu", "none"]), weight_t=st.booleans())
def test_linear_act_huge_inputs(data, dtype, act, weight_t):
    x, w, b, g = data.draw(huge_linear_inputs(dtype))
    weight = w.t().contiguous() if weight_t else w
    xr, wr, br = (t if t is None else t.detach().requires_grad_() for t in (x, weight, b))
    y = F.linear_act(xr, wr, br, act, weight_t=weight_t)
    truth, abs_sum = linear_truth(x, w, b, act)
    rounded = truth.to(dtype).double()
    assert_close_to(y, torch.where(rounded.isinf(), rounded, truth), gemm_bound(abs_sum, x.shape[-1], dtype))
    grads = torch.autograd.grad(y, [t for t in (xr, wr, br) if t is not None], g)
    td = [t.double().requires_grad_() for t in (x, weight, b) if t is not None]
    expected = torch.autograd.grad(reference.linear_act(*td[:2], td[2] if len(td) > 2 else None, act,
                                                        weight_t=weight_t), td, g.double())
    for got, want in zip(grads, expected):
        nan = got.isnan() & ~want.isnan()
        assert not nan.any(), f"NaN where float64 has none at {_where(nan, got, want)}"


@st.composite
def bad_linear_args(draw):
    """Arguments with one thing wrong: act, a dtype, a shape."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    k, n, m = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(0, 3))
    x, w, b, act = torch.zeros(m, k, dtype=dtype), torch.zeros(k, n, dtype=dtype), torch.zeros(n, dtype=dtype), "relu"
    wrong = draw(st.sampled_from(["act", "x_dtype", "w_dtype", "b_dtype", "int", "k", "w_dim", "b_shape", "x_dim"]))
    other = draw(st.sampled_from([d for d in FLOAT_DTYPES if d != dtype]))
    if wrong == "act":
        act = draw(st.sampled_from(["swish", "GELU", "ReLU", "", "None", "relu "]))
    elif wrong in ("x_dtype", "w_dtype", "b_dtype"):
        x, w, b = (t.to(other) if wrong[0] == name else t for t, name in ((x, "x"), (w, "w"), (b, "b")))
    elif wrong == "int":
        x = x.long()
    elif wrong == "k":
        w = torch.zeros(k + 1, n, dtype=dtype)
    elif wrong == "w_dim":
        w = torch.zeros(k, dtype=dtype) if draw(st.booleans()) else torch.zeros(k, n, 1, dtype=dtype)
    elif wrong == "b_shape":
        b = torch.zeros(n + 1, dtype=dtype) if draw(st.booleans()) else torch.zeros(1, n, dtype=dtype)
    else:
        x = torch.zeros((), dtype=dtype)
    return x, w, b, act


@given(args=bad_linear_args())
def test_linear_act_errors_match_reference(args):
    expected = raised(lambda: reference.linear_act(*args))
    assert expected is not None
    assert raised(lambda: OPS.linear_act(*args)) is expected
    assert raised(lambda: F.linear_act(*args)) is expected


@given(args=bad_linear_args(), wrong_grad=st.booleans(), no_out=st.booleans())
def test_linear_act_backward_errors_match_reference(args, wrong_grad, no_out):
    x, w, b, act = args
    grad = torch.zeros(*x.shape[:-1], w.shape[-1] + wrong_grad, dtype=x.dtype if x.is_floating_point() else w.dtype)
    out = None if no_out else grad
    call = (grad, x, w, out, act, [True, True, True])
    # None on both when the bias carried the only error (the backward op takes no bias)
    assert raised(lambda: OPS.linear_act_backward(*call)) is raised(lambda: reference.linear_act_backward(*call))


@pytest.mark.parametrize("k,n", [(0, 3), (4, 0)])
def test_fallback_linear_act_backward_no_features(cpu_fallback, k, n):
    x, w = torch.randn(3, k, requires_grad=True), torch.randn(k, n, requires_grad=True)
    dx, dw = torch.autograd.grad(F.linear_act(x, w).sum(), (x, w))
    assert torch.equal(dx, torch.zeros(3, k)) and torch.equal(dw, torch.zeros(k, n))


def _nan_linear(requires_grad=True):
    x = torch.tensor([[math.nan, 1.0], [2.0, -1.0]], requires_grad=requires_grad)
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]], requires_grad=requires_grad)
    b = torch.tensor([0.1, -0.2], requires_grad=requires_grad)
    return x, w, b


@pytest.mark.parametrize("create_graph", [False, True])
def test_linear_act_backward_passes_gradient_where_output_is_nan(create_graph):
    x, w, b = _nan_linear()
    grads = torch.autograd.grad(F.linear_act(x, w, b).sum(), (x, w, b), create_graph=create_graph)
    xe, we, be = _nan_linear()
    expected = torch.autograd.grad(torch.relu(TF.linear(xe, we.t(), be)).sum(), (xe, we, be))
    for ours, theirs in zip(grads, expected):
        assert_identical(ours, theirs)


# ------------------------------------------------------------------------------------------ linear_glu

GLU_ACTS = ("silu", "gelu", "gelu_tanh", "relu")


@st.composite
def glu_inputs(draw, dtype):
    """x, weight_gate, weight_up, bias_gate, bias_up (both biases or neither), drawn as linear_inputs
    (subnormals the only special values: a near-maximum x makes act(gate) * up overflow where float64 does
    not)."""
    x, wg, bg = draw(linear_inputs(dtype, specials=("subnormal",)))
    wu = draw(tensors(tuple(wg.shape), dtype, allowed=("contiguous", "transposed", "sliced", "offset"),
                      specials=("subnormal",), scales=(1.0, 1e-3)), "weight_up")
    bu = None if bg is None else draw(tensors(tuple(bg.shape), dtype, allowed=("contiguous", "sliced"),
                                              specials=("subnormal",), scales=(1.0, 1e-3)), "bias_up")
    return x, wg, wu, bg, bu


def glu_truth(x, wg, wu, bg, bu, act):
    """act(gate) * up in float64 and its error bound in x's dtype: the products' errors carried through
    act (its slope at most 1.13) and the product, plus a few ulps; also gate, up and their bounds."""
    dtype = x.dtype
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    gate, gate_sum = linear_truth(x, wg, bg, "none")
    up, up_sum = linear_truth(x, wu, bu, "none")
    eg, eu = gemm_bound(gate_sum, wg.shape[0], dtype), gemm_bound(up_sum, wg.shape[0], dtype)
    a = apply_activation(act, gate)
    ea = 1.13 * eg + 8 * eps * (gate.abs() + a.abs()) + tiny
    y = a * up
    return y, ea * up.abs() + (a.abs() + ea) * eu + 8 * eps * y.abs() + tiny, (gate, eg, up, eu)


@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES), act=st.sampled_from(GLU_ACTS))
def test_linear_glu_forward(data, dtype, act):
    x, wg, wu, bg, bu = data.draw(glu_inputs(dtype))
    truth, bound, _ = glu_truth(x, wg, wu, bg, bu, act)
    with torch.no_grad():
        fused = F.linear_glu(x, wg, wu, bg, bu, act)                                  # the fused kernel
    assert fused.shape == (*x.shape[:-1], wg.shape[1]) and fused.dtype == dtype
    assert_identical(OPS.linear_glu(x, wg, wu, bg, bu, act), fused)
    assert_close_to(fused, truth, bound)
    tracked = F.linear_glu(x.detach().requires_grad_(), wg, wu, bg, bu, act)         # the training forward
    assert_close_to(tracked.detach(), truth, bound)
    assert_close_to(reference.linear_glu(x, wg, wu, bg, bu, act), truth, bound)        # the fallback
    plain = apply_activation(act, TF.linear(x, wg.t(), bg)) * TF.linear(x, wu.t(), bu)  # plain PyTorch
    assert_close_to(plain, truth, bound)


# The smooth activations only: relu's derivative jumps at 0, where a gate within its error bound of 0
# takes either side (tests/test_linear_glu.py checks relu's gradients against PyTorch).
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES), act=st.sampled_from(["silu", "gelu", "gelu_tanh"]))
def test_linear_glu_backward(data, dtype, act):
    x, wg, wu, bg, bu = (t if t is None else t.detach().requires_grad_() for t in data.draw(glu_inputs(dtype)))
    inputs = [t for t in (x, wg, wu, bg, bu) if t is not None]
    y = F.linear_glu(x, wg, wu, bg, bu, act)
    g = data.draw(values(tuple(y.shape), dtype, specials=(), scales=(1.0,)), "grad")
    grads = torch.autograd.grad(y, inputs, g)
    _, _, (gate, eg, up, eu) = glu_truth(x.detach(), wg.detach(), wu.detach(), bg, bu, act)
    eps = torch.finfo(dtype).eps
    _, _, slope = SMOOTH[act]
    gd = g.double()
    eg, eu = eg + eps * gate.abs(), eu + eps * up.abs()  # gate and up are saved in the dtype
    a = apply_activation(act, gate)
    dgate = customlayers._activations.derivative(act, gd * up, gate)
    dgate_error = gd.abs() * (up.abs() * (slope * eg + 8 * eps * (1 + gate.abs())) + 1.13 * eu)
    dup = gd * a
    dup_error = gd.abs() * (1.13 * eg + 8 * eps * (gate.abs() + a.abs()))
    xd = x.detach()
    via_gate = gradients_truth(dgate, dgate_error, xd, wg.detach(), bg)
    via_up = gradients_truth(dup, dup_error, xd, wu.detach(), bu)
    truth = [(via_gate[0][0] + via_up[0][0], via_gate[0][1] + via_up[0][1]), via_gate[1], via_up[1]]
    if bg is not None:
        truth += [via_gate[2], via_up[2]]
    for ours, (expected, bound) in zip(grads, truth):
        assert ours.dtype == dtype and ours.shape == expected.shape
        assert_close_to(ours, expected, bound)
    td = [t.detach().double().requires_grad_() for t in inputs]                     # the fallback's
    tb = (td[3], td[4]) if bg is not None else (None, None)
    ref = torch.autograd.grad(reference.linear_glu(td[0], td[1], td[2], *tb, act), td, gd)
    for ref_grad, (expected, bound) in zip(ref, truth):
        assert_close_to(ref_grad, expected, bound)


@given(args=bad_linear_args(), wrong=st.sampled_from(["none", "up_shape", "up_dtype", "up_bias"]))
def test_linear_glu_errors_match_reference(args, wrong):
    x, w, b, act = args
    act = "silu" if act == "relu" else act
    wu, bu = w, b
    if wrong == "up_shape":
        wu = torch.zeros(w.shape[0], w.shape[-1] + 1, dtype=w.dtype) if w.dim() == 2 else w
    elif wrong == "up_dtype":
        wu = w.double() if w.dtype != torch.float64 else w.float()
    elif wrong == "up_bias":
        bu = torch.zeros(b.numel() + 1, dtype=b.dtype)
    call = (x, w, wu, b, bu, act)
    expected = raised(lambda: reference.linear_glu(*call))
    assert expected is not None
    assert raised(lambda: OPS.linear_glu(*call)) is expected
    assert raised(lambda: F.linear_glu(*call)) is expected


# ------------------------------------------------------------------------------------------ masked_uniform_

@st.composite
def bounds(draw, dtype):
    """Valid (low, high, threshold): within the dtype's range, high - low too, and each part of [low, high]
    that the threshold keeps wide enough to hold several values of the dtype (a part holding none:
    test_masked_uniform_fills_when_one_kept_part_holds_no_value)."""
    largest = torch.finfo(dtype).max
    fractions = st.just(0.0) | st.floats(0.01, 0.49)
    if draw(st.booleans()):  # wide: near the dtype's range (high - low stays finite: refused beyond, see
        # test_masked_uniform_refuses_overflowing_range)
        low, high = -largest * draw(fractions), largest * draw(st.floats(0.01, 0.49))
    else:
        low = draw(st.floats(-1000.0, 1000.0))
        high = low + max(draw(st.floats(0.01, 1000.0)), 2 ** -5 * abs(low))
    threshold = max(high, -low) * draw(st.just(0.0) | st.floats(0.01, 0.9))
    for lo, hi in ((max(low, threshold), high), (low, min(high, -threshold))):
        assume(hi <= lo or hi - lo >= 2 ** -5 * max(abs(lo), abs(hi)))
    return low, high, threshold


def check_fill(w, low, high, threshold, exact):
    """Every value 0 or in [low, high] with |value| >= threshold; `exact`: after rounding to w's dtype
    (the kernels' guarantee), else within one step of the dtype (the reference: PyTorch's uniform_)."""
    v = w.double()
    assert v.isfinite().all(), v
    kept = v[v != 0]
    slack = 0.0 if exact else torch.finfo(w.dtype).eps * max(abs(low), abs(high))
    assert (kept >= low - slack).all() and (kept <= high + slack).all(), (kept, low, high)
    assert (kept.abs() >= threshold - slack).all(), (kept, threshold)


# Bounds with high - low beyond the dtype's range: test_masked_uniform_refuses_overflowing_range.
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(-2 ** 63, 2 ** 63 - 1),
       offset=st.integers(0, 2 ** 40))
def test_masked_uniform(data, dtype, seed, offset):
    shape = data.draw(shapes(), "shape")
    low, high, threshold = data.draw(bounds(dtype), "bounds")
    w = data.draw(layouts(torch.empty(shape, dtype=dtype), WRITABLE_LAYOUTS), "layout")
    # the layout's storage filled with a sentinel, to see that nothing outside the view is written
    storage = torch.full((w.untyped_storage().nbytes() // w.element_size(),), 7.0, dtype=dtype)
    w = storage.as_strided(w.shape, w.stride(), w.storage_offset())
    outside = torch.ones_like(storage, dtype=torch.bool)
    outside.as_strided(w.shape, w.stride(), w.storage_offset()).fill_(False)
    assert OPS.masked_uniform_(w, low, high, threshold, seed, offset) is None
    check_fill(w, low, high, threshold, exact=True)
    assert (storage[outside] == 7).all()
    again = torch.empty(shape, dtype=dtype)  # the values follow the logical index, whatever the layout
    OPS.masked_uniform_(again, low, high, threshold, seed, offset)
    assert torch.equal(again, w)
    if offset == 0:
        assert torch.equal(init.masked_uniform_(torch.empty(shape, dtype=dtype), low, high, threshold, seed=seed), w)
    ref = torch.empty(shape, dtype=dtype)   # the fallback: another generator, the same contract
    reference.masked_uniform_op(ref, low, high, threshold, seed, offset)
    check_fill(ref, low, high, threshold, exact=False)
    ref_again = torch.empty(shape, dtype=dtype)
    reference.masked_uniform_op(ref_again, low, high, threshold, seed, offset)
    assert torch.equal(ref, ref_again)


@st.composite
def bad_fill_args(draw):
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    largest = torch.finfo(dtype).max
    low, high, threshold, offset = -10.0, 10.0, 5.0, 0
    wrong = draw(st.sampled_from(["order", "nonfinite", "threshold", "masks_all", "range", "offset", "int",
                                  "expanded"]))
    w = torch.zeros(3, 4, dtype=dtype)
    if wrong == "order":
        low, high = high, draw(st.sampled_from([high, low]))
    elif wrong == "nonfinite":
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        low, high, threshold = draw(st.sampled_from([(bad, high, threshold), (low, bad, threshold),
                                                     (low, high, bad)]))
    elif wrong == "threshold":
        threshold = -draw(st.floats(1e-6, 10.0))
    elif wrong == "masks_all":
        threshold = draw(st.floats(10.0, 1e3))
    elif wrong == "range":
        low, high = draw(st.sampled_from([(-largest * 2, 0.0), (0.0, largest * 2), (-largest * 4, largest * 4)]))
        threshold = 0.0
    elif wrong == "offset":
        offset = -draw(st.integers(1, 2 ** 40))
    elif wrong == "int":
        w = torch.zeros(3, 4, dtype=draw(st.sampled_from([torch.int32, torch.int64, torch.bool])))
    else:
        w = torch.zeros(1, 4, dtype=dtype).expand(3, 4)
    return w, low, high, threshold, offset


@given(args=bad_fill_args(), seed=st.none() | st.integers(0, 2 ** 62))
def test_masked_uniform_errors_match_reference(args, seed):
    w, low, high, threshold, offset = args
    before = w.clone()
    expected = raised(lambda: reference.masked_uniform_op(w, low, high, threshold, seed, offset))
    assert expected is not None
    assert raised(lambda: OPS.masked_uniform_(w, low, high, threshold, seed, offset)) is expected
    assert torch.equal(w, before)


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 3e38), (torch.float64, 1e308)])
def test_masked_uniform_refuses_overflowing_range(dtype, bound):
    assert raised(lambda: torch.empty(4, dtype=dtype).uniform_(-bound, bound)) is not None
    assert raised(lambda: reference.masked_uniform_op(torch.empty(4, dtype=dtype), -bound, bound, 0.0, 0)) is ValueError
    assert raised(lambda: OPS.masked_uniform_(torch.empty(4, dtype=dtype), -bound, bound, 0.0, 0)) is ValueError


@pytest.mark.parametrize("dtype,low", [(torch.float16, -1e-8), (torch.float32, -1e-46)])
def test_masked_uniform_fills_when_one_kept_part_holds_no_value(dtype, low):
    high, threshold = 10.0, -low / 10
    ref = torch.empty(1000, dtype=dtype)
    reference.masked_uniform_op(ref, low, high, threshold, 0)
    w = torch.empty(1000, dtype=dtype)
    OPS.masked_uniform_(w, low, high, threshold, 0)
    check_fill(w, low, high, threshold, exact=True)
