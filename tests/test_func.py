"""The layers as drop-ins under torch.func (grad, vjp, jacrev, jacfwd, jvp, hessian, vmap, per-sample
gradients), forward AD and autocast: each result equals the native PyTorch computation's."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import customlayers
from customlayers._activations import NAMES as ACTIVATIONS
from conftest import DEVICES, requires_extension
from customlayers import functional as F
from customlayers import reference as R

pytestmark = requires_extension()  # the fallback is plain PyTorch: these test the kernels' own paths

F64 = torch.float64


def linear_inputs(device="cpu", m=5, k=4, n=3, dtype=F64):
    return (torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype),
            torch.randn(n, device=device, dtype=dtype))


def ours_loss(x, w, b):
    return F.centered(F.linear_act(x, w, b), 1).sin().sum()


def native_loss(x, w, b):
    h = torch.relu(x @ w + b)
    return (h - h.mean(1, keepdim=True)).sin().sum()


TRANSFORMS = {
    "grad": lambda f: grad(f, argnums=(0, 1, 2)),
    "jacrev": lambda f: jacrev(f, argnums=(0, 1, 2)),
    "jacfwd": lambda f: jacfwd(f, argnums=(0, 1, 2)),
    "hessian_x": lambda f: hessian(f, argnums=0),
    "hessian_w": lambda f: hessian(f, argnums=1),
    "grad_of_grad": lambda f: grad(lambda x, w, b: grad(f, argnums=1)(x, w, b).square().sum(), argnums=(0, 1, 2)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_transforms_match_native(device, name):
    inputs = linear_inputs(device)
    torch.testing.assert_close(TRANSFORMS[name](ours_loss)(*inputs), TRANSFORMS[name](native_loss)(*inputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_vjp_and_jvp_match_native(device, act):
    x, w, b = linear_inputs(device, m=6, k=5, n=4)
    ours = lambda x, w, b: F.linear_act(x, w, b, act)  # noqa: E731
    native = lambda x, w, b: R.linear_act(x, w, b, act)  # noqa: E731
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    for got, expected in zip(jvp(ours, (x, w, b), tangents), jvp(native, (x, w, b), tangents)):
        torch.testing.assert_close(got, expected)
    (out, fn), (ref_out, ref_fn) = vjp(ours, x, w, b), vjp(native, x, w, b)
    g = torch.randn_like(out)
    torch.testing.assert_close(fn(g), ref_fn(g))


def test_relu_tangent_and_gradient_pass_where_output_is_nan():
    """torch.relu's derivative is 0 only where the output is <= 0: a NaN output lets the tangent through."""
    x = torch.tensor([[1.0, float("nan")], [-1.0, 2.0]], dtype=F64)
    w, b = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
    t = torch.ones_like(x)
    _, tangent = jvp(lambda x: F.linear_act(x, w, b), (x,), (t,))
    _, expected = jvp(lambda x: R.linear_act(x, w, b), (x,), (t,))
    torch.testing.assert_close(tangent, expected, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_ad(device):
    x, w, b = linear_inputs(device)
    t = torch.randn_like(x)
    tangents = []
    for lin, cen in ((F.linear_act, F.centered), (R.linear_act, lambda y, d: R.centered(y, [d]))):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(cen(lin(fwAD.make_dual(x, t), w, b), 1)).tangent)
    torch.testing.assert_close(*tangents)


def build_models(device):
    """A model of our layers and the native one with the same parameters (names mapped)."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(customlayers.nn.LinearReLU(4, 8), customlayers.nn.CenteredLayer(),
                               customlayers.nn.MyLinear(8, 3, activation="none")).to(device, F64)
    native = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(device, F64)
    native[0].load_state_dict(ours[0].state_dict())
    with torch.no_grad():
        native[2].weight.copy_(ours[2].weight.t())
        native[2].bias.copy_(ours[2].bias)
    return ours, native


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients(device):
    """vmap(grad(loss)) with functional_call, the torch.func recipe, equals a loop of single-sample grads."""
    ours, _ = build_models(device)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    x, y = torch.randn(7, 4, device=device, dtype=F64), torch.randn(7, 3, device=device, dtype=F64)

    def loss(p, xi, yi):
        return (functional_call(ours, p, (xi.unsqueeze(0),)) - yi).square().sum()

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        ours.zero_grad()
        (ours(x[i:i + 1]) - y[i]).square().sum().backward()
        for name, p in ours.named_parameters():
            torch.testing.assert_close(batched[name][i], p.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_converted_model_under_jacrev_and_jacfwd(device):
    _, native = build_models(device)
    converted = customlayers.convert(native)
    x = torch.randn(3, 4, device=device, dtype=F64)
    for transform in (jacrev, jacfwd):
        torch.testing.assert_close(transform(converted)(x), transform(native)(x))


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_shared_weight_is_one_call_without_warning(device):
    """A vmapped input with a shared weight is more rows: one op call, no performance warning."""
    xs = torch.randn(16, 8, 20, device=device)
    w, b = torch.randn(20, 32, device=device), torch.randn(32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = vmap(F.linear_act, in_dims=(0, None, None))(xs, w, b)
    calls = [e for e in prof.events() if e.name == "customlayers::linear_act"]
    assert len(calls) == 1, [e.name for e in prof.events()]
    torch.testing.assert_close(y, F.linear_act(xs.reshape(-1, 20), w, b).reshape(16, 8, 32))
    # in_dims other than 0 and out_dims
    y1 = vmap(F.linear_act, in_dims=(1, None, None), out_dims=1)(xs.transpose(0, 1), w, b)
    torch.testing.assert_close(y1.transpose(0, 1), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, None), (0, None, 0), (None, None, 0)])
def test_vmap_batched_weight_or_bias(device, in_dims):
    batch = 5
    x, w, b = (torch.randn(batch, *shape, device=device, dtype=F64) if d == 0 else torch.randn(shape, device=device, dtype=F64)
               for d, shape in zip(in_dims, ((6, 4), (4, 3), (3,))))
    got = vmap(F.linear_act, in_dims=in_dims)(x, w, b)
    pick = lambda t, d, i: t[i] if d == 0 else t  # noqa: E731
    expected = torch.stack([R.linear_act(pick(x, in_dims[0], i), pick(w, in_dims[1], i), pick(b, in_dims[2], i))
                            for i in range(batch)])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [None, 0, 1, [-1], [0, 1]])
def test_vmap_centered(device, dim):
    xs = torch.randn(4, 3, 5, device=device, dtype=F64)
    got = vmap(lambda v: F.centered(v, dim))(xs)
    dims = None if dim is None else [dim] if isinstance(dim, int) else dim
    torch.testing.assert_close(got, torch.stack([R.centered(v, dims) for v in xs]))
    torch.testing.assert_close(vmap(lambda v: F.centered(v, dim), in_dims=2)(xs),
                               torch.stack([R.centered(xs[..., i], dims) for i in range(5)]))


@pytest.mark.parametrize("bad", ["act", "bias_shape", "dtype"])
def test_vmap_batched_weight_keeps_the_ops_checks(bad):
    """The batched-weight rule (a batched matmul) refuses what the op refuses, with its exception types."""
    x, w, b = torch.randn(3, 6, 4), torch.randn(3, 4, 5), torch.randn(5)
    args, exc = {"act": ((x, w, b, "swish"), ValueError), "bias_shape": ((x, w, torch.randn(1)), RuntimeError),
                 "dtype": ((x, w.double(), b), TypeError)}[bad]
    with pytest.raises(exc):
        vmap(F.linear_act, in_dims=(0, 0, None, None)[:len(args)])(*args)


def test_vmap_centered_of_scalars_is_zero():
    torch.testing.assert_close(vmap(F.centered)(torch.tensor([1.0, -3.0, 7.0])), torch.zeros(3))


# ----------------------------------------------------------------------------------------- autocast

AUTOCAST = [pytest.param("cpu", torch.bfloat16), pytest.param("cpu", torch.float16),
            pytest.param("cuda", torch.float16, marks=DEVICES[1].marks),
            pytest.param("cuda", torch.bfloat16, marks=DEVICES[1].marks)]


@pytest.mark.parametrize("device,dtype", AUTOCAST)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_autocast_every_activation(device, dtype, act):
    """Under autocast FusedLinear(activation=act) runs in the autocast dtype like nn.Linear + act."""
    torch.manual_seed(0)
    native = torch.nn.Linear(16, 8, device=device)
    ours = customlayers.nn.FusedLinear(16, 8, activation=act, device=device)
    ours.load_state_dict(native.state_dict())
    x = torch.randn(4, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        expected, got = customlayers._activations.apply(act, native(x)), ours(x)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected)
    got.float().sum().backward()
    expected.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.weight.grad, native.weight.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_linear_like_nn_linear(device, dtype):
    """Under autocast, LinearReLU and MyLinear compute in the autocast dtype like nn.Linear, take an input of
    that dtype with float32 weights, and give float32 parameters float32 gradients."""
    torch.manual_seed(0)
    native = torch.nn.Linear(16, 8, device=device)
    ours = customlayers.nn.LinearReLU(16, 8, device=device)
    ours.load_state_dict(native.state_dict())
    mine = customlayers.nn.MyLinear(16, 8, device=device)
    for x in (torch.randn(4, 16, device=device), torch.randn(4, 16, device=device).to(dtype)):
        with torch.autocast(device, dtype=dtype):
            expected, got, book = torch.relu(native(x)), ours(x), mine(x)
        assert got.dtype == expected.dtype == book.dtype == dtype
        torch.testing.assert_close(got, expected)
        got.float().sum().backward()
        assert ours.weight.grad.dtype == torch.float32
        expected.float().sum().backward()
        torch.testing.assert_close(ours.weight.grad, native.weight.grad)
        ours.zero_grad(), native.zero_grad()


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_keeps_float64_and_centered_dtype(device, dtype):
    x = torch.randn(4, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        assert customlayers.nn.CenteredLayer()(x).dtype == (x - x.mean()).dtype == torch.float32
        lin64 = customlayers.nn.LinearReLU(16, 8, device=device, dtype=F64)
        assert lin64(x.double()).dtype == torch.nn.Linear(16, 8, device=device, dtype=F64)(x.double()).dtype == F64


@pytest.mark.parametrize("device,dtype", AUTOCAST[:2])
def test_autocast_under_torch_func_and_compile(device, dtype):
    lin = customlayers.nn.LinearReLU(16, 8, device=device)
    x = torch.randn(4, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        g = grad(lambda w: functional_call(lin, {"weight": w, "bias": lin.bias}, (x,)).float().sum())(lin.weight)
        torch._dynamo.reset()
        compiled = torch.compile(lin, fullgraph=True)(x)
        eager = lin(x)
    assert g.dtype == torch.float32 and compiled.dtype == eager.dtype == dtype
    torch.testing.assert_close(compiled, eager)
