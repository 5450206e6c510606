"""The book's chapter on customlayers: every script of examples/book/ runs (fresh interpreter) and checks
what the book says; my_init, LazyMyLinear, MyLinear without activation and the GPU helpers behave like
the book's code."""
import functools
import glob
import os
import subprocess
import sys
from unittest import mock

import torch
from torch import nn

import customlayers
from customlayers.nn import LazyMyLinear, LinearReLU, MyLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "book", "*.py")))


def test_every_section_has_a_script():
    names = {os.path.basename(path) for path in SCRIPTS}
    assert {"layers_and_blocks.py", "parameters.py", "initialization.py", "tied_parameters.py",
            "deferred_init.py", "custom_layers.py", "file_io.py", "gpus.py"} <= names


# One fresh interpreter runs every script as __main__ (one torch import instead of one per script).
RUNNER = """
import os, runpy, sys, traceback
cwd, failed = os.getcwd(), []
for path in sys.argv[1:]:
    os.chdir(cwd)
    try:
        runpy.run_path(path, run_name="__main__")
    except BaseException:
        failed.append(os.path.basename(path))
        traceback.print_exc()
print("FAILED:", failed)
sys.exit(1 if failed else 0)
"""


def test_book_scripts_run(tmp_path):
    out = subprocess.run([sys.executable, "-c", RUNNER, *SCRIPTS], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert out.returncode == 0, f"examples/book:\n{out.stdout[-2000:]}\n{out.stderr[-5000:]}"


# ------------------------------------------------------------------------------------------ my_init

def test_my_init_touches_linear_layers_only(capsys):
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), LinearReLU(8, 8), MyLinear(8, 3), nn.Conv1d(1, 1, 3))
    untouched = {name: p.detach().clone() for name, p in net.named_parameters()
                 if not name.endswith(("0.weight", "2.weight", "3.weight"))}
    net.apply(customlayers.init.my_init)
    assert capsys.readouterr().out == ""
    for i in (0, 2, 3):
        w = net[i].weight
        assert bool(((w == 0) | (w.abs() >= 5)).all()) and bool((w.abs() <= 10).all()) and bool((w != 0).any())
    for name, p in net.named_parameters():  # LayerNorm weight, Conv1d and every bias left alone
        if name in untouched:
            assert torch.equal(p, untouched[name]), name


def test_my_init_verbose_prints_the_books_line(capsys):
    net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(1))
    net(torch.rand(2, 4))
    net.apply(functools.partial(customlayers.init.my_init, verbose=True))
    assert capsys.readouterr().out == "Init weight torch.Size([8, 4])\nInit weight torch.Size([1, 8])\n"


# ------------------------------------------------------------------------------------------ LazyMyLinear

def test_lazy_mylinear_infers_in_units_from_a_checkpoint():
    trained = MyLinear(9, 6)
    for lazy in (LazyMyLinear(6), nn.Sequential(LazyMyLinear(6))):
        lazy.load_state_dict(nn.Sequential(trained).state_dict() if isinstance(lazy, nn.Sequential)
                             else trained.state_dict())
        layer = lazy[0] if isinstance(lazy, nn.Sequential) else lazy
        assert layer.in_units == 9 and layer.weight.shape == (9, 6)
        x = torch.randn(3, 9)
        torch.testing.assert_close(lazy(x), trained(x))
        assert type(layer) is MyLinear and "in_units=9" in repr(layer)


def test_lazy_mylinear_with_no_input_features_initializes_its_bias():
    filler = torch.full((4096,), float("nan"))  # leave garbage in the allocator's free memory
    del filler
    layer = LazyMyLinear(6)
    y = layer(torch.randn(2, 0))
    assert layer.in_units == 0 and layer.weight.shape == (0, 6)
    assert torch.equal(layer.bias, MyLinear(0, 6).bias) and torch.equal(layer.bias, torch.zeros(6))
    assert torch.equal(y, torch.zeros(2, 6))


# ------------------------------------------------------------------------------------------ MyLinear, no activation

def test_mylinear_without_activation_is_nn_linears_computation():
    """MyLinear(activation='none') as an output layer computes nn.Linear's outputs and gradients (the
    weight transposed), through linear_act, on the book's contiguous (in_units, units) weight."""
    torch.manual_seed(5)
    ours = MyLinear(256, 10, activation="none")
    torch.manual_seed(5)
    ref = nn.Linear(256, 10)
    assert ours.weight.shape == (256, 10) and ours.weight.is_contiguous()  # the book's layout
    assert torch.equal(ours.weight, ref.weight.t()) and torch.equal(ours.bias, ref.bias)
    x = torch.randn(32, 256, requires_grad=True)
    y = ours(x)
    torch.testing.assert_close(y, ref(x))
    y.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad.t())
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    ep = torch.export.export(ours, (x.detach(),))
    torch.testing.assert_close(ep.module()(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == ref(x).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ GPUs

def test_try_gpu_without_gpu():
    with mock.patch("torch.cuda.device_count", return_value=0):
        assert customlayers.try_gpu() == torch.device("cpu") and customlayers.try_gpu(3) == torch.device("cpu")
        assert customlayers.try_all_gpus() == [torch.device("cpu")]


def test_try_gpu_with_gpus():
    with mock.patch("torch.cuda.device_count", return_value=2):
        assert customlayers.try_gpu() == torch.device("cuda:0") and customlayers.try_gpu(1) == torch.device("cuda:1")
        assert customlayers.try_gpu(2) == torch.device("cpu")
        assert customlayers.try_all_gpus() == [torch.device("cuda:0"), torch.device("cuda:1")]
