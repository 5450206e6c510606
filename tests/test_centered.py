"""CenteredLayer / customlayers.centered: correctness against the reference, gradients, errors
and torch.compile, on every device present (opcheck: tests/test_ops.py)."""
import pytest
import torch
from torch import nn

import customlayers
from customlayers import functional as F
from customlayers import reference
from customlayers.nn import CenteredLayer
from conftest import DEVICES, FLOAT_DTYPES, assert_compiled_matches_eager, requires_extension

# Absolute error allowed relative to max|x|: float32 must match a float64 reference within 1e-6.
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_against_reference(x, dim, y=None):
    """y (default: F.centered(x, dim)) equals the float64 reference computed on the same values."""
    y = F.centered(x, dim) if y is None else y
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    dims = None if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    expected = reference.centered(x.double(), dims)
    scale = max(x.double().abs().max().item(), 1.0) if x.numel() else 1.0
    torch.testing.assert_close(y.double(), expected, rtol=TOL[x.dtype], atol=TOL[x.dtype] * scale)


SHAPES_AND_DIMS = [
    ((), None), ((), 0), ((), -1),
    ((0,), None), ((4, 0, 3), None), ((4, 0, 3), 1), ((4, 0, 3), 2),
    ((1,), None), ((7,), None), ((7,), 0), ((5,), (0,)),
    ((3, 5), None), ((3, 5), 0), ((3, 5), 1), ((3, 5), -1), ((3, 5), (0, 1)),
    ((2, 3, 5, 7), None), ((2, 3, 5, 7), 1), ((2, 3, 5, 7), (2, 3)), ((2, 3, 5, 7), (0, 2)),
    ((2, 3, 5, 7), (1, 3)), ((2, 3, 5, 7), (0, 1, 3)), ((2, 3, 5, 7), (-1, 0)),
    ((513,), None), ((4097,), None), ((9, 4100), 1), ((4100, 9), 0), ((3, 700, 37), 1),
    ((64, 1, 300), (0, 1)), ((40, 3000), 0), ((2, 40, 3000), 1), ((3, 9000), 1), (((1 << 20) + 3,), None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape_dim", SHAPES_AND_DIMS, ids=lambda sd: f"{sd}")
def test_matches_reference(device, dtype, shape_dim):
    shape, dim = shape_dim
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1.5).to(device=device, dtype=dtype)
    check_against_reference(x, dim)


def _layouts(device, dtype):
    base = torch.randn(6, 10, 12, 8, dtype=dtype, device=device)
    return {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed": base.transpose(1, 3),
        "sliced": base[:, ::2, 1:, ::3],
        "expanded": torch.randn(6, 1, 12, 1, dtype=dtype, device=device).expand(6, 10, 12, 8),
        "permuted_dense": base.permute(2, 0, 3, 1),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced", "expanded",
                                    "permuted_dense"])
@pytest.mark.parametrize("dim", [None, 0, 1, 3, (2, 3), (0, 2), (1, 3), (0, 1, 2)])
def test_layouts(device, dtype, layout, dim):
    x = _layouts(device, dtype)[layout]
    y = F.centered(x, dim)
    check_against_reference(x, dim, y)
    assert y.stride() == torch.empty_like(x).stride()  # same layout as torch.empty_like, as the fake says


@pytest.mark.parametrize("device", DEVICES)
def test_large_float32_matches_float64(device):
    """16M float32 values with a large offset: the mean accumulates in double."""
    x = (torch.randn(1 << 24, dtype=torch.float64) + 100.0).float().to(device)
    check_against_reference(x, None)
    x2 = x.view(1 << 12, 1 << 12)
    check_against_reference(x2, 0)
    check_against_reference(x2, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_book_example(device):
    layer = CenteredLayer()
    y = layer(torch.FloatTensor([1, 2, 3, 4, 5]).to(device))
    assert y.tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0]
    net = nn.Sequential(nn.Linear(8, 128), CenteredLayer()).to(device)
    Y = net(torch.rand(4, 8, device=device))
    assert abs(Y.mean().item()) < 1e-6


def test_module_repr_and_dims():
    assert repr(CenteredLayer()) == "CenteredLayer()"
    assert repr(CenteredLayer(dim=[1, 2])) == "CenteredLayer(dim=(1, 2))"
    x = torch.randn(4, 5, 6)
    torch.testing.assert_close(CenteredLayer(dim=-1)(x), x - x.mean(-1, keepdim=True))


def test_zero_dim_gives_zero():
    assert F.centered(torch.tensor(3.5)).item() == 0.0
    assert F.centered(torch.tensor(3.5)).dim() == 0


def test_special_values_propagate_like_reference():
    x = torch.tensor([1.0, float("inf"), 3.0])
    torch.testing.assert_close(F.centered(x), reference.centered(x), equal_nan=True)
    x = torch.tensor([[1.0, float("nan")], [2.0, 4.0]])
    torch.testing.assert_close(F.centered(x, 1), reference.centered(x, [1]), equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_dim", [((5,), None), ((3, 4), None), ((3, 4), 0), ((3, 4), 1),
                                       ((2, 3, 4), (0, 2)), ((2, 3, 4), (1,)), ((), None)])
def test_gradcheck(device, shape_dim):
    shape, dim = shape_dim
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.centered(t, dim), (x,))
    assert torch.autograd.gradgradcheck(lambda t: F.centered(t, dim), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_noncontiguous(device):
    x = torch.randn(4, 6, dtype=torch.float64, device=device).t().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.centered(t, 0), (x,))
    assert torch.autograd.gradgradcheck(lambda t: F.centered(t, None), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_eager(device):
    x = torch.randn(64, 33, device=device, requires_grad=True)
    g = torch.randn(64, 33, device=device)
    for dim in (None, 0, 1):
        ours, = torch.autograd.grad(F.centered(x, dim), x, g)
        ref, = torch.autograd.grad(reference.centered(x, None if dim is None else [dim]), x, g)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["int", "bool", "complex", "dim_range", "dim_dup", "dim_type"])
def test_bad_input_errors(device, bad):
    x = torch.randn(3, 4, device=device)
    cases = {
        "int": (lambda: F.centered(torch.arange(6, device=device)), TypeError, "floating-point"),
        "bool": (lambda: F.centered(torch.ones(3, dtype=torch.bool, device=device)), TypeError, "floating-point"),
        "complex": (lambda: F.centered(torch.randn(3, dtype=torch.cfloat, device=device)), TypeError,
                    "floating-point"),
        "dim_range": (lambda: F.centered(x, 2), IndexError, "out of range"),
        "dim_dup": (lambda: F.centered(x, (1, -1)), RuntimeError, "more than once"),
        "dim_type": (lambda: F.centered(x, 1.5), TypeError, "dim must be"),
    }
    fn, exc, msg = cases[bad]
    with pytest.raises(exc, match=msg):
        fn()


@requires_extension()
@pytest.mark.parametrize("device", DEVICES)
def test_op_errors_directly(device):
    """The compiled op checks its inputs itself (C++ TORCH_CHECKs), not only the Python wrapper."""
    op = torch.ops.customlayers.centered.default
    with pytest.raises(TypeError, match="centered: expected x to be a floating-point tensor.*Long"):
        op(torch.arange(4, device=device), None)
    with pytest.raises(IndexError, match="centered: dim 5 is out of range"):
        op(torch.randn(2, 3, device=device), [5])
    with pytest.raises(RuntimeError, match="appears more than once"):
        op(torch.randn(2, 3, device=device), [0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    model = nn.Sequential(nn.Linear(8, 16), CenteredLayer(), nn.ReLU(), nn.Linear(16, 4),
                          CenteredLayer(dim=1)).to(device)
    x = torch.randn(5, 8, device=device)
    assert_compiled_matches_eager(model, x)


@requires_extension()
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    x = torch.randn(3, 1 << 18, device=device)
    a, b = F.centered(x), F.centered(x)
    assert torch.equal(a, b)
    assert torch.equal(F.centered(x, 1), F.centered(x, 1))


# Every CPU code path: short rows, long rows, small blocks with columns, column strips (one chunk, several),
# and few columns with long rows (split between threads when there are several).
PATH_SHAPES = [((1 << 21,), None), ((3, 5000), 1), ((64, 100), 0), ((1000, 300), 0), ((2, 20000), 0),
               ((4096, 16), 0), ((3, 2000, 8), 1)]


@requires_extension()
@pytest.mark.parametrize("shape_dim", PATH_SHAPES, ids=str)
def test_cpu_result_independent_of_thread_count(shape_dim):
    shape, dim = shape_dim
    x = torch.randn(shape) + 10
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = F.centered(x, dim)
        torch.set_num_threads(max(2, before))
        many = F.centered(x, dim)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)
    check_against_reference(x, dim, many)


@requires_extension()
@pytest.mark.parametrize("device", DEVICES)
def test_near_float32_max_gives_zero(device):
    """A sum of float32 values can overflow float32 where the exact sum (in double) does not (the fallback's
    x - x.mean() does: PyTorch sums float32 in float32)."""
    assert torch.equal(F.centered(torch.full((1000,), 1e37, device=device)), torch.zeros(1000, device=device))
    big = torch.finfo(torch.float32).max
    assert torch.equal(F.centered(torch.full((300, 40), big, device=device), 0), torch.zeros(300, 40, device=device))


@requires_extension()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape_dim", PATH_SHAPES, ids=str)
def test_near_dtype_max_matches_reference(device, dtype, shape_dim):
    """Values in [max / 2, max] of the dtype: the means are finite, and so is every result."""
    shape, dim = shape_dim
    big = torch.finfo(dtype).max
    x = (torch.rand(shape, dtype=torch.float64) * 0.5 + 0.5).mul(big).to(device=device, dtype=dtype)
    y = F.centered(x, dim)
    assert torch.isfinite(y).all()
    check_against_reference(x, dim, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@requires_extension()
def test_runs_on_current_stream():
    x = torch.randn(1000, 37, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = F.centered(x, 0)
    s.synchronize()
    check_against_reference(x, 0, y)


# Constant values per dtype: small, negative, and near the dtype's maximum. float64 sums are exact (and so
# the outputs 0) only where value * count needs at most 53 bits: values of few bits there; 1e-3 gives
# ~1e-19 (x - x.mean() does not give 0 either).
CONSTANTS = {torch.float32: (1e-3, -3.3, 1e38), torch.float64: (2.0 ** -10, -3.25, 2.0 ** 1000),
             torch.float16: (1e-3, -3.3, 65504.0), torch.bfloat16: (1e-3, -3.3, 3.3e38)}


@requires_extension()
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_constant_gives_exact_zero(dtype):
    """The CPU kernels sum every dtype in double: a constant float32, float16 or bfloat16 tensor's sum is
    exact (below 2^29 elements), its mean is the value and the output exactly 0 (as x - x.mean() gives for float32), on every path: the global mean of several
    sizes, reductions over inner and outer dims (PATH_SHAPES), and strided, transposed and expanded inputs."""
    for value in CONSTANTS[dtype]:
        cases = [(torch.full((n,), value, dtype=dtype), None) for n in (1, 17, 1000, 100003, (1 << 20) + 3)]
        cases += [(torch.full(shape, value, dtype=dtype), dim) for shape, dim in PATH_SHAPES]
        base = torch.full((6, 10, 12, 8), value, dtype=dtype)
        cases += [(x, dim) for x in (base.transpose(1, 3), base[:, ::2, 1:, ::3], base.permute(2, 0, 3, 1),
                                     base.contiguous(memory_format=torch.channels_last),
                                     torch.full((6, 1, 12, 1), value, dtype=dtype).expand(6, 10, 12, 8))
                  for dim in (None, 0, 1, 3, (2, 3), (0, 2), (1, 3))]
        cases += [(torch.full((3000, 40), value, dtype=dtype).t(), 1), (torch.full((3000, 40), value, dtype=dtype).t(), 0)]
        for x, dim in cases:
            y = F.centered(x, dim)
            assert torch.equal(y, torch.zeros_like(y)), (value, tuple(x.shape), x.stride(), dim, y.abs().max().item())


def test_constant_float32_issue_cases():
    """The issue's cases (once 6.8e-12 and -6e29): exactly 0. Native x - x.mean() gives 0 for 1e-3; for 1e38
    its float32 sum overflows (-inf), as the fallback's does."""
    for value in (1e-3, 1e38):
        x = torch.full((17,), value)
        assert torch.equal(F.centered(x), torch.zeros(17)) or not customlayers._ops.has_kernel("centered", "cpu")
    x = torch.full((17,), 1e-3)
    assert torch.equal(x - x.mean(), torch.zeros(17))
