"""customlayers.convert and LinearReLU as the book's code uses them: LinearReLU is an nn.Linear; convert
fuses a Linear feeding only a ReLU in any forward torch.fx can trace (functional, method, in-place or
module ReLUs, the book's MLP and MySequential, nested blocks), runs output layers as FusedLinear, keeps
parameter names and outputs, falls back to the nn.Sequential walk for untraceable modules, and reports what
it replaced."""
import copy
import inspect
import io
import logging
import warnings

import pytest
import torch
import torch.nn.utils.parametrizations
import torch.nn.utils.parametrize
import torch.nn.utils.prune
from torch import nn
from torch.nn import functional as F

import customlayers
from benchmarks.bench_mlp import LlamaMLP
from customlayers.nn import FusedLinear, LinearGELU, LinearReLU, LinearSiLU

# ------------------------------------------------------------------------------------------ LinearReLU


def test_linear_relu_is_an_nn_linear():
    torch.manual_seed(4)
    ours = LinearReLU(20, 8)
    torch.manual_seed(4)
    ref = nn.Linear(20, 8)
    assert isinstance(ours, nn.Linear) and (ours.in_features, ours.out_features) == (20, 8)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    assert repr(ours) == repr(ref).replace("Linear", "LinearReLU")
    # The book's initializers test isinstance(m, nn.Linear): they now reach the fused layer.
    def init_constant(m):
        if isinstance(m, nn.Linear):
            nn.init.constant_(m.weight, 1)
            nn.init.zeros_(m.bias)
    net = customlayers.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    net.apply(init_constant)
    assert type(net[0]) is LinearReLU and bool((net[0].weight == 1).all()) and bool((net[0].bias == 0).all())
    meta = LinearReLU(3, 5, bias=False, device="meta")
    assert meta.weight.is_meta and meta.bias is None
    assert LinearReLU.from_linear(nn.Linear(3, 5, bias=False)).bias is None


def test_linear_relu_state_dict_and_deepcopy():  # (torch.compile and export: test_linear_act, test_export)
    layer = LinearReLU(6, 4)
    x = torch.randn(3, 6)
    clone = copy.deepcopy(layer)
    assert clone.weight is not layer.weight and torch.equal(clone(x), layer(x))
    ref = nn.Linear(6, 4)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), torch.relu(ref(x)))


# ------------------------------------------------------------------------------------------ the book's blocks

class MLP(nn.Module):
    """The book's MLP (with eager sizes)."""

    def __init__(self, relu=F.relu):
        super().__init__()
        self.hidden = nn.Linear(20, 256)
        self.out = nn.Linear(256, 10)
        self.relu = relu

    def forward(self, X):
        return self.out(self.relu(self.hidden(X)))


class MySequential(nn.Module):
    """The book's MySequential."""

    def __init__(self, *args):
        super().__init__()
        for idx, module in enumerate(args):
            self.add_module(str(idx), module)

    def forward(self, X):
        for module in self.children():
            X = module(X)
        return X


class FixedHiddenMLP(nn.Module):
    """The book's FixedHiddenMLP: Python control flow on a tensor, which fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.rand_weight = torch.rand((20, 20))
        self.linear = nn.Linear(20, 20)

    def forward(self, X):
        X = self.linear(X)
        X = F.relu(X @ self.rand_weight + 1)
        X = self.linear(X)
        while X.abs().sum() > 1:
            X /= 2
        return X.sum()


class NestMLP(nn.Module):
    """The book's NestMLP."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.linear = nn.Linear(32, 16)

    def forward(self, X):
        return self.linear(self.net(X))


RELUS = {
    "F.relu": F.relu,
    "torch.relu": torch.relu,
    "nn.ReLU": nn.ReLU(),
    "torch.relu_": torch.relu_,
    "F.relu_inplace": lambda x: F.relu(x, inplace=True),
    "nn.ReLU_inplace": nn.ReLU(inplace=True),
    "method_relu": lambda x: x.relu(),
    "method_relu_": lambda x: x.relu_(),
}


@pytest.fixture(autouse=True)
def _wide_linears_left(monkeypatch, request):
    """convert()'s default for wide plain Linears (linears=None) depends on the CPU's float32 GEMM: these
    tests, about what is fused, expect them left (linears=False), on every CPU; test_transformer_mlp and
    test_wide_linears_default check the default itself."""
    if request.node.originalname not in ("test_transformer_mlp", "test_wide_linears_default"):
        monkeypatch.setattr(customlayers.fusion, "_own_float32_gemm", lambda: False)


def test_wide_linears_default():
    """linears=None converts the wide float32 Linears exactly where backend_report says the CPU kernels'
    float32 GEMM is gemm_f32."""
    ours = customlayers.backend_report()["build"].get("cpu_gemms", {}).get("float32", "").startswith("gemm_f32")
    assert customlayers.fusion._own_float32_gemm() == ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "found no nn.Linear ..." where it is left
        names = customlayers.convert(nn.Sequential(nn.Linear(8, 32)), report=True)[1]
    assert names == (["0"] if ours else [])


def _check_same(original, converted, x):
    """Same outputs and parameter gradients; the same state_dict keys; checkpoints load both ways."""
    assert list(converted.state_dict()) == list(original.state_dict())
    xo, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yc = original(xo), converted(xc)
    torch.testing.assert_close(yc, yo)
    yo.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(xc.grad, xo.grad)
    grads = {name: p.grad for name, p in original.named_parameters()}
    for name, p in converted.named_parameters():
        torch.testing.assert_close(p.grad, grads[name])
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    original.load_state_dict(torch.load(buffer, weights_only=True))
    converted.load_state_dict(original.state_dict())


@pytest.mark.parametrize("relu", list(RELUS), ids=list(RELUS))
def test_book_mlp_any_relu(relu):
    model = MLP(RELUS[relu])
    converted, fused = customlayers.convert(model, report=True)
    assert fused == ["hidden", "out"] and type(converted.hidden) is LinearReLU and type(converted.out) is FusedLinear
    assert isinstance(converted, MLP) and type(model.hidden) is nn.Linear  # class kept; original untouched
    _check_same(model, converted, torch.randn(4, 20))
    if isinstance(RELUS[relu], nn.ReLU):  # a module call: the ReLU becomes nn.Identity, the class and forward stay
        assert type(converted) is MLP and type(converted.relu) is nn.Identity
    else:  # a functional ReLU: the forward is the traced code without it
        assert type(converted) is not MLP and "relu" not in type(converted).forward.__code__.co_names


# Every other activation form convert() fuses -> the activation it fuses to.
ACTIVATION_FORMS = {
    "nn.GELU": (nn.GELU(), "gelu"),
    "nn.GELU_tanh": (nn.GELU(approximate="tanh"), "gelu_tanh"),
    "F.gelu": (F.gelu, "gelu"),
    "F.gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
    "nn.SiLU": (nn.SiLU(), "silu"),
    "nn.SiLU_inplace": (nn.SiLU(inplace=True), "silu"),
    "F.silu": (F.silu, "silu"),
    "F.silu_inplace": (lambda x: F.silu(x, inplace=True), "silu"),
    "nn.Tanh": (nn.Tanh(), "tanh"),
    "torch.tanh": (torch.tanh, "tanh"),
    "torch.tanh_": (torch.tanh_, "tanh"),
    "method_tanh": (lambda x: x.tanh(), "tanh"),
    "nn.Sigmoid": (nn.Sigmoid(), "sigmoid"),
    "torch.sigmoid": (torch.sigmoid, "sigmoid"),
    "F.sigmoid": (F.sigmoid, "sigmoid"),
    "method_sigmoid_": (lambda x: x.sigmoid_(), "sigmoid"),
}


@pytest.mark.parametrize("form", list(ACTIVATION_FORMS), ids=list(ACTIVATION_FORMS))
def test_book_mlp_any_activation(form):
    function, act = ACTIVATION_FORMS[form]
    model = MLP(function)
    converted, fused = customlayers.convert(model, report=True)
    expected = {"gelu": LinearGELU, "silu": LinearSiLU}.get(act, FusedLinear)
    assert fused == ["hidden", "out"] and type(converted.hidden) is expected and converted.hidden.activation == act
    _check_same(model, converted, torch.randn(4, 20))


@pytest.mark.parametrize("linears", [False, True, None])
@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU])
def test_transformer_mlp(act, linears):
    """The Linear + activation fused; the second Linear (64 outputs) a FusedLinear with linears=True, left
    with False, and by default (None) where the CPU's float32 GEMM is gemm_f32 (backend_report's cpu_gemms)."""
    model = nn.Sequential(nn.Linear(64, 256), act(), nn.Linear(256, 64))
    converted, fused = customlayers.convert(model, report=True, linears=linears)
    wide = linears if linears is not None else customlayers.fusion._own_float32_gemm()  # test_wide_linears_default
    assert fused == (["0", "2"] if wide else ["0"]) and type(converted[0]) is (LinearGELU if act is nn.GELU else LinearSiLU)
    assert type(converted[1]) is nn.Identity and type(converted[2]) is (FusedLinear if wide else nn.Linear)
    _check_same(model, converted, torch.randn(8, 64))
    assert customlayers.convert(model.double(), report=True, linears=True)[1] == ["0"]  # float32 Linears only


# ------------------------------------------------------------------------------- gated MLPs (linear_glu)

class _DecoderLayer(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.post_attention_layernorm = nn.LayerNorm(64)
        self.mlp = LlamaMLP(64, 96, **kwargs)

    def forward(self, x):
        return x + self.mlp(self.post_attention_layernorm(x))


class _SwappedFunctional(nn.Module):
    """Mistral-style names (w1, w2, w3), the product's operands swapped, a functional GELU (tanh)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(64, 96), nn.Linear(64, 96), nn.Linear(96, 64)

    def forward(self, x):
        return self.w2(self.w3(x) * F.gelu(self.w1(x), approximate="tanh"))


@pytest.mark.parametrize("act_fn,act", [(nn.SiLU(), "silu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                        (nn.ReLU(), "relu")])
@pytest.mark.parametrize("bias", [False, True])
def test_llama_mlp_becomes_linear_glu(act_fn, act, bias, caplog):
    model = _DecoderLayer(bias=bias, act_fn=act_fn)
    with caplog.at_level(logging.INFO, logger="customlayers"):
        converted, names = customlayers.convert(model, report=True)
    assert sorted(names) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert f"fused 1 {act}(gate) * up pairs of nn.Linear into linear_glu: mlp.gate_proj * mlp.up_proj (down " \
           "projection mlp.down_proj into FusedLinear)" in caplog.text
    assert type(converted.mlp.down_proj) is FusedLinear and type(converted.mlp.gate_proj) is nn.Linear
    assert "linear_glu(" in inspect.getsource(type(converted).forward)  # the whole layer traced, its forward rewritten
    _check_same(model, converted, torch.randn(2, 5, 64))


def test_llama_mlp_in_bfloat16_matches_float64():
    """The converted bfloat16 block's output and gradients are within bfloat16's tolerance of float64's."""
    model = _DecoderLayer()
    converted = customlayers.convert(model).to(torch.bfloat16)
    x = torch.randn(4, 7, 64)
    xc = x.to(torch.bfloat16).requires_grad_()
    x64 = x.double().requires_grad_()
    model64 = copy.deepcopy(model).double()
    y, y64 = converted(xc), model64(x64)
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2 * y64.abs().max().item())
    y.float().square().sum().backward()
    y64.square().sum().backward()
    torch.testing.assert_close(xc.grad.double(), x64.grad, rtol=3e-2, atol=3e-2 * x64.grad.abs().max().item())
    for (name, p), q in zip(converted.named_parameters(), model64.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=3e-2, atol=3e-2 * q.grad.abs().max().item(), msg=name)


def test_converted_gated_unit_pickles_and_scripts():
    import pickle
    model = _DecoderLayer(bias=True)
    converted = customlayers.convert(model)
    x = torch.randn(3, 64)
    again = pickle.loads(pickle.dumps(converted))
    torch.testing.assert_close(again(x), model(x))
    torch.testing.assert_close(copy.deepcopy(converted)(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(converted)
    torch.testing.assert_close(scripted(x), model(x))


def test_gated_unit_any_operand_order_and_names():
    model = _SwappedFunctional()
    converted, names = customlayers.convert(model, report=True)
    assert sorted(names) == ["w1", "w2", "w3"]
    _check_same(model, converted, torch.randn(3, 64))


class _GateUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 24)

    def forward(self, x):
        g = self.gate(x)
        return self.down(F.silu(g) * self.up(x)) + g.sum()


class _DifferentInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(8, 32), nn.Linear(8, 32)

    def forward(self, x, y):
        return F.silu(self.gate(x)) * self.up(y)


def test_gated_units_that_are_not_one_are_left():
    """A gate whose output is used elsewhere, or gate and up on different inputs, are not a gated unit."""
    with pytest.warns(UserWarning, match="the model is unchanged"):
        converted, names = customlayers.convert(_GateUsedTwice(), report=True)
    model = _DifferentInputs()
    converted, names = customlayers.convert(model, report=True)
    assert names == ["gate"]  # gate + silu still fuse into LinearSiLU
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(converted(x, y), model(x, y))


class _UntraceableWrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) if x.sum() > 0 else -self.inner(x)  # control flow on a tensor: fx cannot trace it


def test_gated_mlp_module_is_a_leaf():
    """A customlayers GatedMLP is kept as it is: inside a traced model, under an untraceable one, as the model."""
    from customlayers.nn import GatedMLP
    for model in (nn.Sequential(nn.LayerNorm(8), GatedMLP(8, 16)), _UntraceableWrapper(GatedMLP(8, 16)), GatedMLP(8, 16)):
        with pytest.warns(UserWarning, match="the model is unchanged"):
            converted = customlayers.convert(model)
        assert all(type(m) is type(c) for m, c in zip(model.modules(), converted.modules()))


class _GateCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(8, 32), nn.Linear(8, 32)

    def forward(self, x, y):
        return F.silu(self.gate(x)) * self.up(x) + F.relu(self.gate(y))


class _UpdatedBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(8, 32), nn.Linear(8, 32)

    def forward(self, x):
        g = self.gate(x)
        x.mul_(2)
        return F.silu(g) * self.up(x)


class _TwoUnits(nn.Module):
    def __init__(self):
        super().__init__()
        self.g1, self.u1, self.g2, self.u2 = (nn.Linear(8, 32) for _ in range(4))

    def forward(self, x):
        return F.silu(self.g1(x)) * self.u1(x) + F.silu(self.g2(x)) * self.u2(x)


class _UpdatedThroughAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(8, 32), nn.Linear(8, 32)

    def forward(self, x):
        x = x * 1
        y = x.view(-1)
        a = F.silu(self.gate(x))
        y.add_(1)
        return a * self.up(x)


def test_two_gated_units_on_one_input_and_a_change_through_a_view():
    model = _TwoUnits()
    converted, names = customlayers.convert(model, report=True)
    assert sorted(names) == ["g1", "g2", "u1", "u2"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(converted(x), model(x))
    model = _UpdatedThroughAView()
    converted, names = customlayers.convert(model, report=True)
    assert "up" not in names
    torch.testing.assert_close(converted(x), model(x))


def test_gated_units_not_fused_when_a_linear_is_called_elsewhere_or_x_changes_between():
    model = _GateCalledTwice()
    converted, names = customlayers.convert(model, report=True)
    assert "up" not in names
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(converted(x, y), model(x, y))
    model = _UpdatedBetween()
    converted, names = customlayers.convert(model, report=True)
    assert "up" not in names
    x = torch.randn(3, 8)
    torch.testing.assert_close(converted(x.clone()), model(x.clone()))


class _GeluResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_residual_block_with_functional_gelu(caplog):
    model = _GeluResidual()
    with caplog.at_level(logging.INFO, logger="customlayers"):
        converted, fused = customlayers.convert(model, report=True)
    assert fused == ["fc1"] and type(converted.fc1) is LinearGELU
    assert "fused 1 nn.Linear + gelu into LinearGELU: fc1" in caplog.text
    _check_same(model, converted, torch.randn(5, 32))


def test_tied_linear_with_two_activations_is_not_fused():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 32)

        def forward(self, x):
            return F.gelu(self.fc(x)) + F.silu(self.fc(x))

    with pytest.warns(UserWarning, match="the model is unchanged"):
        converted = customlayers.convert(Two())
    assert type(converted.fc) is nn.Linear


def test_my_sequential_nested_and_deepcopy():
    model = MySequential(nn.Linear(20, 20), nn.ReLU(), NestMLP(), nn.Linear(16, 10))
    converted, fused = customlayers.convert(model, report=True)
    assert fused == ["0", "2.net.0", "2.net.2", "2.linear", "3"] and type(converted) is MySequential
    assert type(converted.get_submodule("2.linear")) is FusedLinear and type(converted.get_submodule("3")) is FusedLinear
    _check_same(model, converted, torch.randn(4, 20))
    clone = copy.deepcopy(converted)
    x = torch.randn(3, 20)
    torch.testing.assert_close(clone(x), converted(x))


def test_untraceable_falls_back_to_children_and_sequential_walk():
    model = nn.Sequential(NestMLP(), nn.Linear(16, 20), nn.ReLU(), FixedHiddenMLP())
    converted, fused = customlayers.convert(model, report=True, outputs=False)
    # FixedHiddenMLP is untraceable; its Linear feeds a matmul and a second call: not fused.
    assert fused == ["0.net.0", "0.net.2", "1"] and type(converted[3].linear) is nn.Linear
    _check_same(model, converted, torch.randn(4, 20))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.a(x)
        return self.act(h) + h + self.act(self.b(x))  # a's output has a second user; act is shared


def test_only_a_linear_feeding_only_a_relu_is_fused():
    model = _Residual()
    converted, fused = customlayers.convert(model, report=True, outputs=False)
    assert fused == ["b"] and type(converted.a) is nn.Linear and type(converted.act) is nn.ReLU
    _check_same(model, converted, torch.randn(5, 8))
    shared = nn.Linear(8, 8)
    tied = nn.Sequential(shared, nn.ReLU(), shared)  # second use without a ReLU: not fused
    with pytest.warns(UserWarning, match="found no nn.Linear"):
        assert customlayers.convert(tied, report=True, outputs=False)[1] == []
    # With outputs=True it has few outputs: one FusedLinear, wherever it appears.
    converted, fused = customlayers.convert(tied, report=True)
    assert fused == ["0", "2"] and type(converted[0]) is FusedLinear and converted[0] is converted[2]
    _check_same(tied, converted, torch.randn(5, 8))


class _ModeDependent(nn.Module):
    def __init__(self, relu=F.relu):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.hidden, self.out, self.relu = nn.Linear(8, 8), nn.Linear(8, 2), relu

    def forward(self, x):
        x = self.relu(self.hidden(self.block(x)))
        return self.out(x * 2 if self.training else x)


@pytest.mark.parametrize("relu", ["F.relu", "nn.ReLU"])
def test_forward_reading_training_is_kept(relu):
    """A trace fixes `self.training` to one mode: such a forward is not traced, its children are searched."""
    model = _ModeDependent(RELUS[relu])
    converted, fused = customlayers.convert(model, report=True, outputs=False)
    assert type(converted) is _ModeDependent  # the forward is the original one
    assert fused == ["block.0"]
    for mode in (True, False):
        model.train(mode), converted.train(mode)
        _check_same(model, converted, torch.randn(3, 8))


class _ReluOnlyWhenTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(5, 5), nn.ReLU()

    def forward(self, x):
        if self.training:
            return self.act(self.fc(x))
        return self.fc(x)


class _Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.calls, self.last = nn.Linear(5, 5), 0, None

    def forward(self, x):
        self.calls += 1
        h = F.relu(self.fc(x))
        self.last = h
        return h


def test_mode_dependent_relu_module_not_fused():
    """Traced in training mode, fc feeds only the ReLU; in eval mode it does not: nothing may be fused."""
    model = _ReluOnlyWhenTraining()
    with pytest.warns(UserWarning, match="found no nn.Linear"):
        converted = customlayers.convert(model, outputs=False)
    converted.eval(), model.eval()
    _check_same(model, converted, torch.randn(3, 5))


def test_forward_with_side_effects_not_traced():
    """A forward that sets attributes keeps them working: it is not traced (a trace would drop them and leave
    fx Proxies on the module)."""
    with pytest.warns(UserWarning, match="found no nn.Linear"):
        converted = customlayers.convert(_Stateful(), outputs=False)
    assert converted.calls == 0 and converted.last is None
    y = converted(torch.randn(2, 5))
    assert converted.calls == 1 and converted.last is y


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a  # the same layer under two names
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(F.relu(self.b(F.relu(self.a(x)))))


def test_tied_linear_fused_everywhere_it_is_followed_by_relu():
    model = _Tied()
    converted, fused = customlayers.convert(model, report=True)
    assert fused == ["a", "b", "out"] and converted.a is converted.b and type(converted.a) is LinearReLU
    assert len(list(converted.parameters())) == len(list(model.parameters()))
    _check_same(model, converted, torch.randn(4, 6))  # gradients of both uses add up in one weight


def test_reports_logs_and_warns(caplog):
    with caplog.at_level(logging.INFO, logger="customlayers"):
        customlayers.convert(MLP())
    assert "fused 1 nn.Linear + relu into LinearReLU: hidden" in caplog.text
    assert "fused 1 output nn.Linear into FusedLinear: out" in caplog.text
    with pytest.warns(UserWarning, match="the model is unchanged"):
        customlayers.convert(nn.Sequential(nn.Linear(3, 17), nn.Hardtanh()))  # not fused; too wide an output layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        customlayers.convert(MLP())  # something fused: no warning


def test_converted_functional_model_exports():
    """The traced forward that replaces one with F.relu goes through dynamo (as torch.compile's does)."""
    model = MLP()
    converted = customlayers.convert(model)
    x = torch.randn(8, 20)
    ep = torch.export.export(converted, (x,))
    assert "torch.ops.customlayers.linear_act" in ep.graph_module.code
    torch.testing.assert_close(ep.module()(x), model(x))


# ------------------------------------------------------------------------------------------ output layers


def test_fused_linear_is_an_nn_linear():
    torch.manual_seed(5)
    ours = FusedLinear(256, 10)
    torch.manual_seed(5)
    ref = nn.Linear(256, 10)
    assert isinstance(ours, nn.Linear) and repr(ours) == repr(ref).replace("Linear", "FusedLinear")
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    shared = FusedLinear.from_linear(ref)
    assert shared.weight is ref.weight and shared.bias is ref.bias and shared.to_linear().weight is ref.weight
    assert FusedLinear.from_linear(nn.Linear(3, 5, bias=False)).bias is None
    with pytest.raises(TypeError, match="FusedLinear.from_linear: expected an nn.Linear"):
        FusedLinear.from_linear(nn.ReLU())
    for shape in [(4, 256), (2, 3, 256), (256,)]:
        x = torch.randn(shape, dtype=torch.float64)
        ref64, ours64 = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
        _check_same(ref64, ours64, x)


def test_outputs_only_narrow_plain_linears():
    """Only an nn.Linear with at most OUTPUT_FEATURES outputs that no ReLU follows; subclasses and wide
    layers stay; outputs=False keeps every output layer."""
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(20, 30), nn.Hardtanh(), nn.Linear(30, customlayers.nn.OUTPUT_FEATURES),
                          Sub(16, 4), nn.Linear(4, customlayers.nn.OUTPUT_FEATURES + 1))
    converted, names = customlayers.convert(model, report=True)
    assert names == ["2"] and [type(m) for m in converted] == [nn.Linear, nn.Hardtanh, FusedLinear, Sub, nn.Linear]
    _check_same(model, converted, torch.randn(3, 20))
    book = customlayers.convert(MLP(), outputs=False)
    assert type(book.hidden) is LinearReLU and type(book.out) is nn.Linear


class _TiedUntraceable(nn.Module):
    """A forward that reads self.training (not traced): the Sequential's pair is fused, head's plain use of
    the same Linear must stay without a ReLU."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.block, self.head = nn.Sequential(shared, nn.ReLU()), shared

    def forward(self, x):
        return self.head(self.block(x) * (2 if self.training else 1))


def test_outputs_keep_plain_uses_of_a_fused_linear():
    model = _TiedUntraceable()
    converted, names = customlayers.convert(model, report=True)
    assert type(converted.block[0]) is LinearReLU and type(converted.head) is FusedLinear
    assert converted.head.weight is converted.block[0].weight and names == ["block.0", "head"]
    _check_same(model, converted, torch.randn(4, 8))


def test_outputs_leave_hooked_or_non_parameter_linears():
    hooked, plain = nn.Linear(8, 4), nn.Linear(8, 4)
    hooked.register_forward_pre_hook(lambda m, args: None)
    del plain.weight
    plain.weight = torch.randn(4, 8)  # a plain tensor attribute, as the old weight_norm leaves it
    model = nn.Sequential(nn.Linear(8, 8), nn.Hardtanh(), hooked, nn.Hardtanh(), nn.Linear(4, 8), nn.Hardtanh(), plain)
    converted, names = customlayers.convert(model, report=True)
    assert names == ["0", "4"] and type(converted[2]) is nn.Linear and type(converted[6]) is nn.Linear


# ------------------------------------------------------------------------------------------ model surgery

class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace a Sequential holding it (the nn.Sequential walk runs)."""

    def forward(self, x):
        return x if x.sum() > -1e30 else -x


class _FunctionalMLP(nn.Module):
    def __init__(self, first, middle, last):
        super().__init__()
        self.first, self.middle, self.last = first, middle, last

    def forward(self, x):
        return self.last(F.relu(self.middle(F.relu(self.first(x)))))


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def _prune(m):
    torch.nn.utils.prune.l1_unstructured(m, "weight", 0.5)


SURGERIES = {
    "pruned": _prune,
    "parametrized": lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", _Scale()),
    "weight_norm": lambda m: torch.nn.utils.parametrizations.weight_norm(m),
    "spectral_norm": lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
    "old_weight_norm": lambda m: torch.nn.utils.weight_norm(m),
    "forward_hook": lambda m: m.register_forward_hook(lambda mod, args, out: out * 2),
    "forward_pre_hook": lambda m: m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,)),
    "backward_hook": lambda m: m.register_full_backward_hook(lambda mod, gin, gout: None),
}


def _surgery_model(path, surgery):
    """Two operated Linears (one feeding a ReLU, one an output layer) and a plain Linear + ReLU between them."""
    first, middle, last = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
    SURGERIES[surgery](first)
    SURGERIES[surgery](last)
    if path == "functional":
        return _FunctionalMLP(first, middle, last), (first, middle, last)
    tail = [_Untraceable()] if path == "sequential" else []
    return nn.Sequential(first, nn.ReLU(), middle, nn.ReLU(), *tail, last), (first, middle, last)


@pytest.mark.parametrize("surgery", list(SURGERIES))
@pytest.mark.parametrize("path", ["sequential", "traced", "functional"])
def test_convert_leaves_operated_linears_alone(path, surgery):
    torch.manual_seed(1)
    model, (first, middle, last) = _surgery_model(path, surgery)
    torch.manual_seed(1)
    original, _ = _surgery_model(path, surgery)  # (a pruned module does not deep-copy)
    x = torch.randn(5, 4)
    converted, names = customlayers.convert(model, inplace=True, report=True)
    assert converted is model
    modules = dict(converted.named_modules())
    middle_name = "middle" if path == "functional" else "2"
    assert names == [middle_name] and type(modules[middle_name]) is LinearReLU
    operated = [m for n, m in modules.items() if n in (("first", "last") if path == "functional" else ("0", str(len(converted) - 1)))]
    assert operated[0] is first and operated[1] is last
    assert not isinstance(first, (LinearReLU, FusedLinear)) and not isinstance(last, (LinearReLU, FusedLinear))
    if path != "functional":
        assert type(converted[1]) is nn.ReLU  # the operated Linear's ReLU stays
    _check_same(original, converted, x)


@pytest.mark.parametrize("path", ["sequential", "traced", "functional"])
def test_convert_leaves_hooked_relu_alone(path):
    model, _ = _surgery_model(path, "forward_hook")
    relu = nn.ReLU()
    relu.register_forward_hook(lambda mod, args, out: out + 1)
    if path == "functional":
        model = nn.Sequential(nn.Linear(4, 8), relu, nn.Linear(8, 3))
    else:
        model[3] = relu
    original = copy.deepcopy(model)
    converted = customlayers.convert(model)
    assert any(m is not None and m._forward_hooks for m in converted.modules() if type(m) is nn.ReLU)
    _check_same(original, converted, torch.randn(5, 4))


BOOKMOD = '''
import torch
from torch import nn
from torch.nn import functional as F


class Book(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(F.relu(self.hidden(x)))

    def describe(self):
        return "a book"
'''


@pytest.fixture
def bookmod(tmp_path, monkeypatch):
    (tmp_path / "bookmod.py").write_text(BOOKMOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("bookmod", None)
    module = importlib.import_module("bookmod")
    yield module
    sys.modules.pop("bookmod", None)


def test_rewritten_forward_pickles_and_loads_in_a_fresh_interpreter(tmp_path, bookmod):
    import os
    import subprocess
    import sys
    import textwrap
    model = bookmod.Book()
    converted = customlayers.convert(model)
    assert type(converted).__name__ == "Book" and isinstance(converted, bookmod.Book) and type(converted) is not bookmod.Book
    assert list(converted.state_dict()) == list(model.state_dict()) == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    x = torch.randn(5, 4)
    expected = converted(x)
    path = tmp_path / "book.pt"
    torch.save(converted, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is type(converted) and loaded.describe() == "a book"
    assert type(loaded.hidden) is LinearReLU and type(loaded.out) is FusedLinear
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert list(loaded.state_dict()) == list(model.state_dict())
    clone = copy.deepcopy(converted)
    torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    torch.save((x, expected.detach()), tmp_path / "xy.pt")
    code = textwrap.dedent(f"""
        import sys
        import torch
        sys.path.insert(0, {str(tmp_path)!r})
        model = torch.load({str(path)!r}, weights_only=False)   # imports customlayers and bookmod itself
        x, y = torch.load({str(tmp_path / 'xy.pt')!r})
        import bookmod
        assert isinstance(model, bookmod.Book) and type(model).__name__ == "Book"
        assert type(model.hidden).__name__ == "LinearReLU"
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        print(sorted(model.state_dict()))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)  # the same backend (CUSTOMLAYERS_FORCE_FALLBACK) as this process
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=str(tmp_path),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(model.state_dict()))


def test_rewritten_forward_scripts(bookmod):
    converted = customlayers.convert(bookmod.Book())
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(converted)
    torch.testing.assert_close(scripted(x), converted(x), rtol=0, atol=0)
