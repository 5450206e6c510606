"""The ops' autograd for torch.func transforms and forward AD.

The compiled ops carry their autograd in C++ (csrc/autograd.cpp): the fastest path, and the one libtorch,
torch.compile and torch.export use. PyTorch refuses C++ autograd Functions under torch.func transforms
(grad, vjp, jacrev, jacfwd, jvp, hessian, vmap) and they have no forward AD, so while a transform or a
forward-AD level is active, customlayers.functional calls the ops through the Python
``torch.autograd.Function``s below instead. Each runs the op below autograd and has:

- ``backward`` built from the same Functions, so gradients of any order work under the transforms;
- ``jvp`` (forward AD) with torch's derivative of the activation (customlayers._activations; relu's: the
  tangent passes where the output is not <= 0);
- ``vmap``, a batching rule: a batched input is one call on more rows (linear_act) or on the per-sample
  dims (centered); a batched weight or bias is a batched matmul of PyTorch's.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch._prims_common import canonicalize_dim
from torch.autograd import forward_ad

from . import _activations, _ops, reference

Dims = Optional[Union[int, Sequence[int]]]

def transforms_active() -> bool:
    """Whether a torch.func transform or a forward-AD level is active (then the Python Functions run)."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


class CenteredFunction(torch.autograd.Function):
    """y = x - mean(x, dims): a symmetric projection, so dx = centered(dy) and the tangent is centered(dx)."""

    @staticmethod
    def forward(x: torch.Tensor, dims: Dims) -> torch.Tensor:
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.op("centered")(x, dims)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.dims = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return CenteredFunction.apply(grad, ctx.dims), None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _dims):
        return CenteredFunction.apply(tangent, ctx.dims)

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, dims: Dims):
        if in_dims[0] is None:
            return CenteredFunction.apply(x, dims), None
        x = x.movedim(in_dims[0], 0)
        ndim = x.dim() - 1  # of one sample
        if ndim == 0:  # a 0-dim sample is its own mean
            return CenteredFunction.apply(x.unsqueeze(1), [1]).squeeze(1), 0
        dims = [dims] if isinstance(dims, int) else dims
        per_sample = range(ndim) if not dims else dims
        return CenteredFunction.apply(x, [canonicalize_dim(ndim, d) + 1 for d in per_sample]), 0


class LinearActFunction(torch.autograd.Function):
    """out = act(x @ weight + bias). The backward is the C++ create_graph path's, from these Functions:
    g' = act'(.) * g (from the output, or the pre-activation x @ weight + bias recomputed with this Function),
    dx = g' @ weight^T, dweight = x^T @ g', dbias = g'.sum(rows)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.op("linear_act")(x, weight, bias, act)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, act = inputs
        ctx.act = act
        saved = (x, weight, bias, output if _activations.saves_output(act) else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def _saved(ctx) -> Optional[torch.Tensor]:
        """What the derivative of ctx.act reads: the output, or the pre-activation (recomputed)."""
        x, weight, bias, out = ctx.saved_tensors
        return LinearActFunction.apply(x, weight, bias, "none") if _activations.ACTIVATIONS[ctx.act].saves == "pre" else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, _, _ = ctx.saved_tensors
        g = _activations.derivative(ctx.act, grad, LinearActFunction._saved(ctx))
        k, n = weight.shape
        g2 = g.reshape(-1, n)
        dx = LinearActFunction.apply(g, weight.t(), None, "none") if ctx.needs_input_grad[0] else None
        dw = LinearActFunction.apply(x.reshape(-1, k).t(), g2, None, "none") if ctx.needs_input_grad[1] else None
        db = g2.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None

    @staticmethod
    def jvp(ctx, tx: Optional[torch.Tensor], tw: Optional[torch.Tensor], tb: Optional[torch.Tensor], _act):
        x, weight, _, _ = ctx.saved_tensors
        parts = []
        if tx is not None:
            parts.append(LinearActFunction.apply(tx, weight, None, "none"))
        if tw is not None:
            parts.append(LinearActFunction.apply(x, tw, None, "none"))
        if tb is not None:
            parts.append(tb.expand(*x.shape[:-1], weight.shape[1]))
        tangent = sum(parts[1:], parts[0])
        return _activations.derivative(ctx.act, tangent, LinearActFunction._saved(ctx))

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str):
        x_dim, w_dim, b_dim, _ = in_dims
        if w_dim is None and b_dim is None:  # a batch of inputs: more rows, one call
            return LinearActFunction.apply(x.movedim(x_dim, 0), weight, bias, act), 0
        # A batch of weights or biases (per-sample gradients ask for x^T @ g'): PyTorch's batched matmul.
        size = info.batch_size
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(size, *x.shape)
        weight = weight.movedim(w_dim, 0) if w_dim is not None else weight.expand(size, *weight.shape)
        if bias is not None:
            bias = bias.movedim(b_dim, 0) if b_dim is not None else bias.expand(size, *bias.shape)
        if size:  # the op's checks, on one sample: the batched matmul would broadcast or promote instead
            reference.check_linear(x[0], weight[0], None if bias is None else bias[0], "linear_act")
            reference.check_act(act, "linear_act")
        y = torch.bmm(x.reshape(size, -1, x.shape[-1]), weight)
        if bias is not None:
            y = y + bias.unsqueeze(1)
        y = _activations.apply(act, y)
        return y.reshape(*x.shape[:-1], weight.shape[-1]), 0
