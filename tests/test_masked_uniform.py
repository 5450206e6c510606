"""customlayers.init.masked_uniform_ / my_init: the Philox generator against known answers, the exact
distribution (Kolmogorov-Smirnov, zero fraction), exactness after rounding to each dtype, determinism,
layouts, errors and the pure-PyTorch fallback (opcheck: tests/test_ops.py)."""
import math

import pytest
import torch
from torch import nn

import customlayers
from customlayers import init, reference
from conftest import DEVICES, FLOAT_DTYPES, requires_extension

scipy_stats = pytest.importorskip("scipy.stats")

M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """Philox4x32-10 in pure Python: the model the kernels are checked against."""
    c, (k0, k1) = list(ctr), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def model(numel, dtype, seed, offset=0):
    """What the kernels give for a=0, b=1, threshold=0 (then every value is the raw uniform draw u)."""
    per = 2 if dtype == torch.float64 else 4
    out = []
    for g in range((numel + per - 1) // per):
        x = philox4x32_10([g & M32, g >> 32, offset & M32, offset >> 32], [seed & M32, (seed >> 32) & M32])
        if per == 4:
            out += [(w >> 8) * 2.0 ** -24 for w in x]
        else:
            out += [((x[0] << 21) | (x[1] >> 11)) * 2.0 ** -53, ((x[2] << 21) | (x[3] >> 11)) * 2.0 ** -53]
    return torch.tensor(out[:numel], dtype=torch.float64)


def exact_cdf(a, b, t):
    """CDF of U(a, b) conditioned on |w| >= t."""
    neg = max(0.0, min(b, -t) - a)
    pos = max(0.0, b - max(a, t))

    def cdf(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        below = (x.clamp(a, min(b, -t)) - a).clamp(min=0) if neg > 0 else torch.zeros_like(x)
        above = (x.clamp(max(a, t), b) - max(a, t)) if pos > 0 else torch.zeros_like(x)
        return ((below + above) / (neg + pos)).numpy()
    return cdf, 1.0 - (neg + pos) / (b - a)


def check_exact(w, a, b, t):
    """Every value is exactly 0 or in [a, b] with |w| >= t, after rounding to w's dtype."""
    v = w.double().flatten()
    kept = v[v != 0]
    assert torch.isfinite(v).all()
    assert (kept >= a).all() and (kept <= b).all() and (kept.abs() >= t).all()


def check_zero_fraction(w, p_zero, sigmas=5.0):
    n = w.numel()
    frac = (w == 0).double().mean().item()
    assert abs(frac - p_zero) <= sigmas * math.sqrt(p_zero * (1 - p_zero) / n) + 1.0 / n, (frac, p_zero)


@pytest.fixture
def fallback(cpu_fallback):
    """customlayers.init on the pure-PyTorch reference."""


# ------------------------------------------------------------------------------------------ generator

def test_philox_model_known_answers():
    """The Python model reproduces the Random123 known-answer vectors of Philox4x32-10."""
    assert philox4x32_10([0] * 4, [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10([M32] * 4, [M32, M32]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@requires_extension()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789, 0), ((1 << 63) + 77, 5), (42, (1 << 40) + 3)])
@pytest.mark.parametrize("numel", [37, 1029])  # 1029: whole vector blocks (written in place) and a partial one
def test_kernel_matches_philox_model(device, dtype, seed, offset, numel):
    w = torch.empty(numel, dtype=dtype, device=device)
    signed = seed - (1 << 64) if seed >= 1 << 63 else seed
    torch.ops.customlayers.masked_uniform_(w, 0.0, 1.0, 0.0, signed, offset)
    assert torch.equal(w.double().cpu(), model(numel, dtype, seed, offset))


# ------------------------------------------------------------------------------------------ distribution

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bounds", [(-10.0, 10.0, 5.0), (-3.0, 10.0, 5.0), (-1.0, 2.0, 0.25), (2.0, 7.0, 3.0),
                                    (-4.0, -1.0, 0.0)])
def test_distribution(device, dtype, bounds):
    a, b, t = bounds
    w = init.masked_uniform_(torch.empty(1 << 20, dtype=dtype, device=device), a, b, t, seed=2024).cpu()
    check_exact(w, a, b, t)
    cdf, p_zero = exact_cdf(a, b, t)
    check_zero_fraction(w, p_zero)
    kept = w[w != 0].double()
    assert scipy_stats.kstest(kept.numpy(), cdf).pvalue > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_book_setting(device):
    """The book's init: half the values zero, the rest uniform on [-10, -5] U [5, 10]."""
    w = init.masked_uniform_(torch.empty(1000, 1000, device=device)).cpu()
    check_exact(w, -10, 10, 5)
    check_zero_fraction(w, 0.5)
    cdf, _ = exact_cdf(-10.0, 10.0, 5.0)
    assert scipy_stats.kstest(w[w != 0].double().numpy(), cdf).pvalue > 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
# Bounds up to half of float16's range: high - low = 65504 is the largest span it allows (as uniform_).
@pytest.mark.parametrize("bounds", [(-10.0, 10.0, 5.0), (-10.05, 10.05, 5.01), (-10.0, 10.0, 9.99),
                                    (-0.3, 0.7, 0.1), (-32752.0, 32752.0, 1000.0), (0.1, 0.2, 0.0)])
def test_exact_after_rounding(device, dtype, bounds):
    """Rounding to the dtype never gives a kept value outside [a, b] or below the threshold."""
    a, b, t = bounds
    w = init.masked_uniform_(torch.empty(1 << 18, dtype=dtype, device=device), a, b, t, seed=7)
    assert w.dtype == dtype
    check_exact(w.cpu(), a, b, t)
    _, p_zero = exact_cdf(a, b, t)
    check_zero_fraction(w, p_zero)


# ------------------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("device", DEVICES)
def test_manual_seed_reproducible_and_fresh(device):
    torch.manual_seed(3)
    first = init.masked_uniform_(torch.empty(4096, device=device)).clone()
    second = init.masked_uniform_(torch.empty(4096, device=device)).clone()
    torch.manual_seed(3)
    again = init.masked_uniform_(torch.empty(4096, device=device))
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_seed_and_generator(device):
    a = init.masked_uniform_(torch.empty(5000, device=device), seed=11)
    b = init.masked_uniform_(torch.empty(5000, device=device), seed=11)
    c = init.masked_uniform_(torch.empty(5000, device=device), seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator(device).manual_seed(5)
    x = init.masked_uniform_(torch.empty(5000, device=device), generator=g).clone()
    y = init.masked_uniform_(torch.empty(5000, device=device), generator=g).clone()
    g.manual_seed(5)
    assert torch.equal(init.masked_uniform_(torch.empty(5000, device=device), generator=g), x)
    assert not torch.equal(x, y)


@requires_extension()
def test_thread_count_independent():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = init.masked_uniform_(torch.empty(1 << 21), seed=99).clone()
        torch.set_num_threads(max(2, before))
        many = init.masked_uniform_(torch.empty(1 << 21), seed=99)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@requires_extension()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("numel", [1, 3, 4097, (1 << 20) + 5])
def test_cpu_cuda_bit_identical(dtype, numel):
    cpu = init.masked_uniform_(torch.empty(numel, dtype=dtype), -3.0, 9.0, 2.5, seed=31337)
    cuda = init.masked_uniform_(torch.empty(numel, dtype=dtype, device="cuda"), -3.0, 9.0, 2.5, seed=31337)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[cpu.element_size()]
    assert torch.equal(cpu.view(bits), cuda.cpu().view(bits))


@requires_extension()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_unaligned_and_current_stream():
    base = torch.empty(1 << 16, device="cuda")
    expected = init.masked_uniform_(torch.empty((1 << 16) - 1, device="cuda"), seed=8)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        view = init.masked_uniform_(base[1:], seed=8)   # storage offset 1: no vector stores
    s.synchronize()
    assert torch.equal(view, expected)


# ------------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "offset"])
def test_non_contiguous_matches_contiguous(device, dtype, layout):
    """Values follow the logical (row-major) index, whatever the memory layout."""
    base = torch.zeros(6, 10, 12, 8, dtype=dtype, device=device)
    view = {"transposed": base.transpose(1, 3), "sliced": base[:, ::2, 1:, ::3],
            "channels_last": base.contiguous(memory_format=torch.channels_last), "offset": base[1:, 3]}[layout]
    before = base.clone()
    out = init.masked_uniform_(view, seed=17)
    assert out is view
    expected = init.masked_uniform_(torch.empty(view.shape, dtype=dtype, device=device), seed=17)
    assert torch.equal(view, expected)
    if layout in ("sliced", "offset"):  # elements outside the view are untouched
        mask = torch.ones_like(base, dtype=torch.bool)
        (mask[:, ::2, 1:, ::3] if layout == "sliced" else mask[1:, 3]).fill_(False)
        assert torch.equal(base[mask], before[mask])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_scalar(device):
    e = torch.empty(0, 5, device=device)
    assert init.masked_uniform_(e) is e
    s = init.masked_uniform_(torch.empty((), device=device), seed=1)
    assert s.dim() == 0 and (s.item() == 0 or 5 <= abs(s.item()) <= 10)


def test_expanded_tensor_rejected():
    with pytest.raises(RuntimeError, match="more than one element"):
        init.masked_uniform_(torch.empty(1, 4).expand(3, 4))


# ------------------------------------------------------------------------------------------ autograd

@pytest.mark.parametrize("device", DEVICES)
def test_parameter_requiring_grad(device):
    p = nn.Parameter(torch.empty(64, 32, device=device))
    version = p._version
    out = init.masked_uniform_(p, seed=4)
    assert out is p and p.requires_grad and p.grad_fn is None and p._version > version
    check_exact(p.detach().cpu(), -10, 10, 5)


@requires_extension()
def test_op_refuses_tracked_tensor():
    p = nn.Parameter(torch.empty(8))
    with pytest.raises(RuntimeError, match="masked_uniform_: the op is not differentiable"):
        torch.ops.customlayers.masked_uniform_(p)
    with torch.no_grad():
        torch.ops.customlayers.masked_uniform_(p, seed=1)
    assert (p != 0).any()


def test_autograd_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("customlayers::masked_uniform_", "Autograd")


# ------------------------------------------------------------------------------------------ errors

ERRORS = {
    "int": (lambda: torch.zeros(4, dtype=torch.int64), {}, TypeError, "expected tensor to be a floating-point"),
    "bool": (lambda: torch.zeros(4, dtype=torch.bool), {}, TypeError, "floating-point"),
    "complex": (lambda: torch.zeros(4, dtype=torch.cfloat), {}, TypeError, "floating-point"),
    "a_ge_b": (None, dict(a=3.0, b=3.0), ValueError, "expected low < high"),
    "nan": (None, dict(b=float("nan")), ValueError, "expected finite bounds"),
    "inf": (None, dict(a=float("-inf")), ValueError, "expected finite bounds"),
    "negative_threshold": (None, dict(threshold=-1.0), ValueError, "expected threshold >= 0"),
    "all_masked": (None, dict(threshold=10.0), ValueError, "masks every value"),
    "all_masked_one_side": (None, dict(a=-4.0, b=5.0, threshold=5.0), ValueError, "masks every value"),
    "half_range": (lambda: torch.zeros(4, dtype=torch.float16), dict(a=-1e5, b=1e5), ValueError,
                   "exceed the Half range"),
    # high - low overflows the dtype although both bounds are finite (torch's uniform_ refuses it too)
    "float_span": (None, dict(a=-3e38, b=3e38, threshold=0.0), ValueError, "also for high - low"),
    "double_span": (lambda: torch.zeros(4, dtype=torch.float64), dict(a=-1e308, b=1e308, threshold=0.0), ValueError,
                    "also for high - low"),
    "no_value": (lambda: torch.zeros(4, dtype=torch.bfloat16), dict(a=1.001, b=1.002, threshold=0.0), ValueError,
                 "no BFloat16 value lies in"),
    "seed_and_generator": (None, dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    "seed_range": (None, dict(seed=1 << 64), ValueError, "seed must be in"),
    "seed_type": (None, dict(seed=1.5), TypeError, "seed must be an int"),
}


@pytest.mark.parametrize("path", ["kernel", "fallback"])
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors(path, case, request):
    if path == "fallback":
        if case == "no_value":
            pytest.skip("only the kernels refuse bounds between two values of the dtype (reference.masked_uniform_op)")
        request.getfixturevalue("fallback")
    elif not customlayers._ops.loaded():
        pytest.skip(f"compiled extension not in use: {customlayers._ops.reason()}")
    make, kwargs, exc, msg = ERRORS[case]
    w = make() if make else torch.zeros(4)
    with pytest.raises(exc, match=msg):
        init.masked_uniform_(w, **kwargs)
    if exc is ValueError and case not in ("seed_and_generator", "seed_range"):
        assert (w == 0).all()  # nothing written


@requires_extension()
def test_op_errors_directly():
    op = torch.ops.customlayers.masked_uniform_.default
    with pytest.raises(TypeError, match="masked_uniform_: expected tensor to be a floating-point tensor.*Long"):
        op(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="masked_uniform_: expected low < high, but got low=2, high=1"):
        op(torch.zeros(3), 2.0, 1.0)
    with pytest.raises(ValueError, match="expected offset >= 0"):
        op(torch.zeros(3), offset=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_on_other_device():
    with pytest.raises(RuntimeError, match="expected a generator on cuda"):
        init.masked_uniform_(torch.empty(3, device="cuda"), generator=torch.Generator())


# ------------------------------------------------------------------------------------------ my_init

@pytest.mark.parametrize("device", DEVICES)
def test_my_init_linear_and_sequential(device, capsys):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 16), nn.LazyLinear(3))).to(device)
    biases = [net[0].bias.detach().clone(), net[2][0].bias.detach().clone()]
    net.apply(init.my_init)
    assert capsys.readouterr().out == ""
    for lin in (net[0], net[2][0]):
        check_exact(lin.weight.detach().cpu(), -10, 10, 5)
        assert (lin.weight != 0).any() and (lin.weight == 0).any()
    assert torch.equal(net[0].bias, biases[0]) and torch.equal(net[2][0].bias, biases[1])
    assert nn.parameter.is_lazy(net[2][1].weight)  # left alone
    net(torch.randn(2, 4, device=device))           # still usable, lazy layer materializes
    single = nn.Linear(3, 5).to(device)
    init.my_init(single)
    check_exact(single.weight.detach().cpu(), -10, 10, 5)


# ------------------------------------------------------------------------------------------ fallback

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fallback_distribution(fallback, dtype):
    """The reference (the book's code) has the same distribution, though not the same values."""
    w = init.masked_uniform_(torch.empty(1 << 18, dtype=dtype), seed=5)
    v = w.double()
    kept = v[v != 0]
    assert (kept.abs() >= 5).all() and (kept >= -10).all() and (kept <= 10).all()
    check_zero_fraction(w, 0.5)
    if dtype in (torch.float32, torch.float64):
        cdf, _ = exact_cdf(-10.0, 10.0, 5.0)
        assert scipy_stats.kstest(kept.numpy(), cdf).pvalue > 1e-3
    assert torch.equal(init.masked_uniform_(torch.empty(1 << 18, dtype=dtype), seed=5), w)
    torch.manual_seed(0)
    x = init.masked_uniform_(torch.empty(100)).clone()
    torch.manual_seed(0)
    assert torch.equal(init.masked_uniform_(torch.empty(100)), x)


def test_reference_is_the_books_code():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    w = reference.masked_uniform_(torch.empty(50, 20), generator=g1)
    book = torch.empty(50, 20)
    nn.init.uniform_(book, -10, 10, generator=g2)
    book *= book.abs() >= 5
    assert torch.equal(w, book)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def fn(w):
        init.masked_uniform_(w, -2.0, 6.0, 1.0, seed=3)
        return w * 2

    torch._dynamo.reset()
    eager_w = torch.empty(4, 25, device=device)
    expected = fn(eager_w)
    compiled_w = torch.empty(4, 25, device=device)
    out = torch.compile(fn, fullgraph=True)(compiled_w)
    assert torch.equal(out, expected) and torch.equal(compiled_w, eager_w)
