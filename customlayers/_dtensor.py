"""DTensor sharding rules for linear_act, linear_glu, their backward ops and centered, for tensor parallelism.

A DTensor reaches the compiled ops below autograd: the ops' C++ autograd (csrc/autograd.cpp) records the
DTensor inputs, calls the op, and DTensor's __torch_dispatch__ then needs a sharding strategy for
``customlayers::linear_act`` (forward) and ``customlayers::linear_act_backward`` (backward), and for
``customlayers::centered`` (both); each runs the kernel on the local shards. Without the compiled library
the ops are the references' CompositeImplicitAutograd code, which DTensor sees as the aten ops it is made
of, so nothing is registered.

The rules list only the shardings whose local results are exact (weight is (in_features, out_features), or
with weight_t (out_features, in_features)):
- replicated: every input and the output Replicate;
- column-sharded: weight sharded on its out_features dim (Shard(1); with weight_t, nn.Linear's weight
  Shard(0), as ColwiseParallel shards it), bias Shard(0), x Replicate -> output sharded on its last dim;
  the activation is elementwise, so each rank's columns are exact;
- batch-sharded: x sharded on a leading dim, weight and bias Replicate -> output sharded on that dim.
Any other input placements are redistributed by DTensor to one of these. A row-sharded weight would give
partial sums before the activation, which no activation but 'none' commutes with: it is not listed. The
rules hold for every activation (customlayers._activations.NAMES): each is elementwise, and the backward's
`out` (the output or the pre-activation) is sharded as grad is.
linear_glu: the same three, both weights (and biases) sharded alike on the hidden dim (act(gate) * up is
elementwise), as ColwiseParallel shards a LLaMA MLP's gate_proj and up_proj.
centered: replicated, or sharded on a dim that the mean is not taken over.

Importing torch.distributed.tensor costs a large part of torch's own import time, so this module does not:
``register_when_imported()`` registers the rules as soon as torch.distributed.tensor is imported (at once
when it already is).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

import torch

_MODULE = "torch.distributed.tensor"


def register() -> None:
    """Registers the rules with DTensor (torch.distributed.tensor must be importable)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.customlayers

    def rule(op, static_argnum):
        """register_sharding(op), with the arguments from static_argnum on (the non-tensor ones) in DTensor's
        cache key: register_sharding keys on int arguments only, which would leave out act, output_mask
        (which outputs exist) and centered's dim (which the rule depends on)."""
        def wrap(fn):
            register_sharding(op)(fn)
            DTensor._op_dispatcher.sharding_propagator.op_to_schema_info[op] = RuntimeSchemaInfo(
                static_argnum, needs_pytree=True)
            return fn
        return wrap

    @rule(ops.linear_act.default, 3)
    def linear_act_sharding(x, weight, bias=None, act="relu", weight_t=False):
        has_bias = bias is not None
        last = x.ndim - 1
        replicated = ([Replicate()], [Replicate(), Replicate(), Replicate() if has_bias else None, None, None])
        columns = ([Shard(last)], [Replicate(), Shard(0 if weight_t else 1), Shard(0) if has_bias else None, None,
                                   None])
        rows = [([Shard(d)], [Shard(d), Replicate(), Replicate() if has_bias else None, None, None])
                for d in range(last)]
        return [replicated, columns, *rows]

    @rule(ops.linear_act_backward.default, 4)
    def linear_act_backward_sharding(grad, x, weight, out, act, output_mask):
        # outputs (grad_x, grad_weight, grad_bias); inputs (grad, x, weight, out, act, output_mask)
        has_out = out is not None
        last = x.ndim - 1
        replicated = ([Replicate()] * 3, [Replicate(), Replicate(), Replicate(), Replicate() if has_out else None,
                                          None, None])
        # Each rank holds some output columns: grad_x sums over all of them (Partial); grad_weight and
        # grad_bias are the rank's own columns.
        columns = ([Partial(), Shard(1), Shard(0)],
                   [Shard(last), Replicate(), Shard(1), Shard(last) if has_out else None, None, None])
        # Each rank holds some rows of the batch: grad_weight and grad_bias sum over all of them.
        rows = [([Shard(d), Partial(), Partial()],
                 [Shard(d), Shard(d), Replicate(), Shard(d) if has_out else None, None, None]) for d in range(last)]
        return [replicated, columns, *rows]

    @rule(ops.linear_glu.default, 5)
    def linear_glu_sharding(x, weight_gate, weight_up, bias_gate=None, bias_up=None, act="silu", weight_t=False):
        # As linear_act's: both weights (and biases) sharded on the hidden dim, or x on a leading dim.
        def biases(placement):
            return [placement if bias_gate is not None else None, placement if bias_up is not None else None]
        last = x.ndim - 1
        hidden = Shard(0 if weight_t else 1)
        replicated = ([Replicate()], [Replicate(), Replicate(), Replicate(), *biases(Replicate()), None, None])
        columns = ([Shard(last)], [Replicate(), hidden, hidden, *biases(Shard(0)), None, None])
        rows = [([Shard(d)], [Shard(d), Replicate(), Replicate(), *biases(Replicate()), None, None])
                for d in range(last)]
        return [replicated, columns, *rows]

    @rule(ops.linear_glu_forward.default, 5)
    def linear_glu_forward_sharding(x, weight_gate, weight_up, bias_gate=None, bias_up=None, act="silu",
                                    weight_t=False):
        # (out, gate, up), all three placed as linear_glu's output.
        return [([out[0]] * 3, inputs) for out, inputs in
                linear_glu_sharding(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t)]

    @rule(ops.linear_glu_backward.default, 6)
    def linear_glu_backward_sharding(grad, x, weight_gate, weight_up, gate, up, act, output_mask):
        # outputs (grad_x, grad_weight_gate, grad_weight_up, grad_bias_gate, grad_bias_up); the weights (in,
        # hidden). Hidden-sharded: grad_x sums over every rank's columns; batch-sharded: the weights' and
        # biases' gradients sum over every rank's rows.
        last = x.ndim - 1
        replicated = ([Replicate()] * 5, [Replicate()] * 6 + [None, None])
        columns = ([Partial(), Shard(1), Shard(1), Shard(0), Shard(0)],
                   [Shard(last), Replicate(), Shard(1), Shard(1), Shard(last), Shard(last), None, None])
        rows = [([Shard(d), Partial(), Partial(), Partial(), Partial()],
                 [Shard(d), Shard(d), Replicate(), Replicate(), Shard(d), Shard(d), None, None]) for d in range(last)]
        return [replicated, columns, *rows]

    @rule(ops.centered.default, 1)
    def centered_sharding(x, dim=None):
        # The mean is over `dim` (every dim when None or empty): sharding any other dim is exact. The
        # backward is centered too.
        reduced = {d % x.ndim for d in dim} if dim and x.ndim else set(range(x.ndim))
        return [([Replicate()], [Replicate(), None]),
                *(([Shard(d)], [Shard(d), None]) for d in range(x.ndim) if d not in reduced)]


def _register_or_warn() -> None:
    """register(), which uses DTensor's private sharding-propagation API: if a torch release changes it, DTensor
    keeps working (our ops without sharding rules on DTensors) and a RuntimeWarning says why."""
    try:
        register()
    except Exception as exc:  # noqa: BLE001 (whatever a changed private API raises)
        warnings.warn(f"customlayers: the DTensor sharding rules of its ops could not be registered ({exc!r}); "
                      "DTensors reach these ops without them", RuntimeWarning, stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when torch.distributed.tensor is about to be imported, it removes itself and
    makes that module's loader call register() once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_or_warn()

        spec.loader.exec_module = exec_and_register
        return spec


def register_when_imported() -> None:
    """Registers the rules now if torch.distributed.tensor is imported, else as soon as it is."""
    if not torch.distributed.is_available():
        return
    if _MODULE in sys.modules:
        _register_or_warn()
    else:
        sys.meta_path.insert(0, _RegisterOnImport())
