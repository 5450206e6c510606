"""Benchmark of customlayers.functional.linear_act (MyLinear / LinearReLU: relu(x @ W + b)) against eager
PyTorch, nn.Linear + nn.ReLU, torch._addmm_activation and torch.compile, forward and forward+backward, at
MLP layer sizes. "GEMM floor" runs only the op's matrix products with torch.mm (forward: x @ W; backward
adds g @ W^T and x^T @ g): the time left above it is what the bias, ReLU, masking and bias-gradient work
and the framework overhead cost. On a GPU, "GEMM" rows time the hand-written GEMM alone against cuBLAS. Run: python -m benchmarks.bench_linear_act [run.py options]."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from customlayers import _activations
from customlayers.functional import linear_act
from customlayers.nn import FusedLinear, MyLinear

from .harness import (FWD, FWD_BWD, OURS, Case, Device, Truth, accumulation_dtype, bind, compile_fresh,
                      unit_roundoff)

OP = "linear_act"
# (batch, in_features, out_features): the book's MLP layer (batch 256, 20 -> 256), MNIST's first layer,
# a transformer-sized MLP and a square one.
SHAPES = [(256, 20, 256), (8192, 256, 256), (64, 784, 256), (2048, 784, 256), (8192, 784, 256),
          (64, 1024, 4096), (1024, 1024, 4096), (8192, 4096, 4096)]
QUICK_SHAPES = [(256, 20, 256), (8192, 256, 256), (2048, 784, 256)]
BF16_SHAPES = {"cuda": [(1024, 1024, 4096), (8192, 4096, 4096)],   # full run (--quick: QUICK_SHAPES' last)
               "cpu": [(256, 20, 256), (2048, 784, 256)]}
# GPU only: the hand-written GEMM alone (no bias, no activation) against cuBLAS (torch.mm; float32 without
# TF32, torch's default) at 4096^3, so that `vs cuBLAS` is the fraction of cuBLAS's speed it reaches.
GEMM_SHAPE = (4096, 4096, 4096)
GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w + b)


def nn_linear_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.nn.functional.linear(x, w.t(), b))


def addmm_activation(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._addmm_activation(b, x, w)


def reference(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], g: Optional[torch.Tensor] = None,
              activation: str = "relu") -> Callable[[], object]:
    """The float64 truth of act(x @ w + b) (g = None) or of its gradients w.r.t. (x, w, b) for the output
    gradient g, from the case's inputs (the math of customlayers.reference, in float64).

    With a ReLU the gradients have a slack: where the float64 pre-activation z is within rounding of 0,
    an implementation may legitimately see it on the other side, so those elements' contributions to dx,
    dw and db (|g| through |w|, |x|, or alone) may go either way. "Within rounding": |z| at most sqrt(k)
    unit roundoffs of the accumulation dtype (float32 for float16 and bfloat16) times |x| @ |w| + |b|
    (the sqrt(k) growth harness.tolerance assumes for long sums), i.e. z computed with that accumulation and rounded to the
    dtype at most once, at the end (rounding does not change a sign). An implementation that rounds
    x @ w to float16 or bfloat16 before adding the bias (eager ``relu(x @ w + b)`` in those dtypes) flips
    masks within u(dtype) * |x @ w| of 0, far more of them: its gradients are not excused."""
    dtype, k = x.dtype, x.shape[-1]
    x64, w64 = x.detach().double(), w.detach().double()
    b64 = torch.zeros(w.shape[-1], dtype=torch.float64, device=x.device) if b is None else b.detach().double()
    relu = activation == "relu"

    def truth():
        z = x64 @ w64 + b64
        if g is None:
            return torch.relu(z) if relu else z
        g64 = g.double()
        dz = g64 * (z > 0) if relu else g64
        dx, dw, db = dz @ w64.T, x64.transpose(-1, -2) @ dz, dz.sum(0)
        if not relu:
            return dx, dw, db
        bound = math.sqrt(k) * unit_roundoff(accumulation_dtype(dtype)) * (x64.abs() @ w64.abs() + b64.abs())
        loose = g64.abs() * (z.abs() <= bound)
        return (Truth(dx, loose @ w64.abs().T), Truth(dw, x64.abs().transpose(-1, -2) @ loose),
                Truth(db, loose.sum(0)))
    return truth


def gemm_floor(x: torch.Tensor, w: torch.Tensor, g: Optional[torch.Tensor]) -> Callable[[], object]:
    """The op's GEMMs alone: 1 mm forward, 3 mm forward+backward (g = None: forward only). dW is
    written in the weight's layout, as the op returns it (for nn.Linear.weight.t(), the layout of
    nn.Linear's weight, so that accumulating it into .grad needs no copy): BLAS's speed depends on it."""
    x, w = x.detach(), w.detach()
    if g is None:
        return lambda: torch.mm(x, w)
    dw = torch.empty_like(w)
    return lambda: (torch.mm(x, w), torch.mm(g, w.t()), torch.mm(x.t(), g, out=dw))


def gemm_cases(device: torch.device) -> List[Case]:
    m, k, n = GEMM_SHAPE
    out = []
    for dtype in GEMM_DTYPES:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(k, n, device=device, dtype=dtype) / k ** 0.5
        impls = {OURS: lambda x=x, w=w: linear_act(x, w, None, "none"), "cuBLAS": lambda x=x, w=w: torch.mm(x, w)}
        out.append(Case(OP, m * k * n, dtype, FWD, impls, label=f"{m}x{k}->{n} GEMM",
                        reference=reference(x, w, None, activation="none"), k=k))
    return out


# torch.vmap over a batch of inputs sharing the weight (the batching rule makes it one call on more rows),
# against that one call: (batch, rows, in_features, out_features).
VMAP_SHAPE = (256, 64, 20, 256)


def vmap_case(device: torch.device) -> Case:
    batch, rows, k, n = VMAP_SHAPE
    xs = torch.randn(batch, rows, k, device=device)
    w, b = torch.randn(k, n, device=device) / k ** 0.5, torch.randn(n, device=device)
    vmapped = torch.vmap(linear_act, in_dims=(0, None, None))
    flat = xs.reshape(batch * rows, k)
    impls = {OURS: lambda: vmapped(xs, w, b), "one call": lambda: linear_act(flat, w, b).reshape(batch, rows, n),
             "vmap of eager": lambda: torch.vmap(eager, in_dims=(0, None, None))(xs, w, b)}
    return Case(OP, batch * rows * k * n, torch.float32, FWD, impls, label=f"vmap {batch}x({rows}x{k})->{n}",
                reference=reference(xs, w, b), k=k)


# Output layers, forward+backward, against nn.Linear with the same parameters: the book's MyLinear(256, 10,
# activation="none") (linear_act without the ReLU on the book's row-major (in, out) weight) and the
# FusedLinear that convert() makes of an nn.Linear output layer (nn.Linear's (out, in) weight).
OUTPUT_LAYERS = [("MyLinear none", (256, 256, 10)), ("FusedLinear", (256, 256, 10)), ("FusedLinear", (2048, 784, 10))]


def output_layer_case(device: torch.device, kind: str, shape: Tuple[int, int, int]) -> Case:
    m, k, n = shape
    book = kind == "MyLinear none"
    ours = MyLinear(k, n, activation="none", device=device) if book else FusedLinear(k, n, device=device)
    ref = torch.nn.Linear(k, n, device=device)
    with torch.no_grad():
        ref.weight.copy_(ours.weight.t() if book else ours.weight)
        ref.bias.copy_(ours.bias)
    x, g = torch.randn(m, k, device=device), torch.randn(m, n, device=device)

    def nn_linear():
        dw, db = torch.autograd.grad(ref(x), (ref.weight, ref.bias), g)
        return (dw.t() if book else dw), db  # in our layer's layout, to be compared
    impls = {OURS: lambda: torch.autograd.grad(ours(x), (ours.weight, ours.bias), g), "nn.Linear": nn_linear}

    def truth():  # float64 gradients of x @ W^T + b w.r.t. (W, b), in our layer's layout
        w64 = ref.weight.detach().double().requires_grad_()
        b64 = ref.bias.detach().double().requires_grad_()
        dw, db = torch.autograd.grad(torch.nn.functional.linear(x.double(), w64, b64), (w64, b64), g.double())
        return (dw.t() if book else dw), db
    return Case(OP, m * k * n, torch.float32, FWD_BWD, impls, label=f"{kind} {m}x{k}->{n}", reference=truth,
                k=max(m, k))


# The other activations (customlayers._activations): at the book size and 2048x784->256, float32 and bfloat16,
# against eager act(x @ W + b) with torch's function and torch.compile of it (--quick: gelu and silu, the book
# size in float32).
ACTIVATION_SHAPES = [(256, 20, 256), (2048, 784, 256)]
SMOOTH_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "tanh", "sigmoid")


def activation_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: str,
                         g: Optional[torch.Tensor] = None) -> Callable[[], object]:
    """The float64 truth of act(x @ w + b) (g = None) or of its gradients w.r.t. (x, w, b) for g (torch's
    activation and autograd in float64; a smooth activation needs no slack)."""
    def truth():
        x64, w64, b64 = (t.detach().double().requires_grad_(g is not None) for t in (x, w, b))
        y = _activations.apply(act, x64 @ w64 + b64)
        return y.detach() if g is None else torch.autograd.grad(y, (x64, w64, b64), g.double())
    return truth


def layer_inputs(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """x (m, k), nn.Linear's (out, in) weight seen through .t() as LinearReLU uses it, the bias, and a gradient
    of the output (m, n)."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = (torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5).t()
    b = torch.randn(n, device=device, dtype=dtype)
    g = torch.randn(m, n, device=device, dtype=dtype)
    return x, w, b, g


def mode_inputs(mode: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The inputs as a mode's implementations take them: leaves requiring grad for FWD_BWD."""
    return (x, w, b) if mode == FWD else tuple(t.detach().requires_grad_() for t in (x, w, b))


def activation_cases(device: torch.device, quick: bool) -> List[Case]:
    out = []
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    for act in (("gelu", "silu") if quick else SMOOTH_ACTIVATIONS):
        def eager_act(x, w, b, act=act):
            return _activations.apply(act, x @ w + b)

        for (m, k, n) in ACTIVATION_SHAPES[:1] if quick else ACTIVATION_SHAPES:
            for dtype in dtypes:
                x, w, b, g = layer_inputs(m, k, n, device, dtype)
                for mode in (FWD, FWD_BWD):
                    inputs = mode_inputs(mode, x, w, b)
                    fns: Dict[str, Callable] = {OURS: lambda x, w, b, act=act: linear_act(x, w, b, act),
                                                "eager": eager_act,
                                                "torch.compile": compile_fresh(eager_act, dynamic=False)}
                    out.append(Case(OP, m * k * n, dtype, mode, bind(fns, inputs, mode, (g,)),
                                    label=f"{act} {m}x{k}->{n}",
                                    reference=activation_reference(x, w, b, act, g if mode == FWD_BWD else None),
                                    k=k if mode == FWD else max(m, k, n)))
    return out


def cases(device: Device, quick: bool = False) -> List[Case]:
    """fwd and fwd+bwd cases; the weight is nn.Linear's (out, in) parameter seen through .t(), as
    LinearReLU uses it, and every implementation of a case shares its inputs."""
    torch.manual_seed(0)
    device = torch.device(device)
    shapes = [(s, torch.float32) for s in (QUICK_SHAPES if quick else SHAPES)]
    shapes += [(s, torch.bfloat16) for s in (QUICK_SHAPES[-1:] if quick else BF16_SHAPES.get(device.type, []))]
    out = []
    for (m, k, n), dtype in shapes:
        x, w, b, g = layer_inputs(m, k, n, device, dtype)
        for mode in (FWD, FWD_BWD):
            inputs = mode_inputs(mode, x, w, b)
            fns: Dict[str, Callable] = {OURS: linear_act, "eager": eager, "nn.Linear+ReLU": nn_linear_relu,
                                        "torch.compile": compile_fresh(eager, dynamic=False)}
            if mode == FWD:
                fns["_addmm_activation"] = addmm_activation
            # The floor computes only part of the op: its output is not checked.
            impls = {"GEMM floor": gemm_floor(x, w, g if mode == FWD_BWD else None),
                     **bind(fns, inputs, mode, (g,))}
            out.append(Case(OP, m * k * n, dtype, mode, impls, label=f"{m}x{k}->{n}", unchecked=("GEMM floor",),
                            reference=reference(x, w, b, g if mode == FWD_BWD else None),
                            k=k if mode == FWD else max(m, k, n)))
    out += activation_cases(device, quick)
    out += [vmap_case(device)] + [output_layer_case(device, kind, shape) for kind, shape in OUTPUT_LAYERS]
    return out + (gemm_cases(device) if device.type == "cuda" else [])


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .run import main as run_main
    run_main(argv, default_ops=[OP])


if __name__ == "__main__":
    main()
