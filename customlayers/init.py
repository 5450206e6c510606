"""Weight initializers in the style of ``torch.nn.init``: in place, under ``torch.no_grad()``, returning
the tensor.

    net.apply(customlayers.init.my_init)    # the book's initializer, on every linear layer
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from . import _ops

__all__ = ["linear_", "masked_uniform_", "my_init"]

_INT64 = 1 << 64


def _seed_arg(seed: int) -> int:
    """A seed as torch.manual_seed accepts it, in [-2**63, 2**64), as the op's int64 (same 64 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"masked_uniform_: seed must be an int, got {type(seed).__name__}")
    if not -(1 << 63) <= seed < _INT64:
        raise ValueError(f"masked_uniform_: seed must be in [-2**63, 2**64), got {seed}")
    return seed - _INT64 if seed >= 1 << 63 else seed


def masked_uniform_(tensor: torch.Tensor, a: float = -10.0, b: float = 10.0, threshold: float = 5.0,
                    generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Tensor:
    """Fill ``tensor`` with values drawn from U(a, b), then set those with ``|value| < threshold`` to zero:
    the book's ``uniform_(w, -10, 10); w *= w.abs() >= 5`` in one pass over memory.

    Kept values lie in [a, b] with ``|value| >= threshold`` after rounding to the tensor's dtype.

    Args:
        tensor: float32, float64, float16 or bfloat16 tensor of any shape and layout (a Parameter that
            requires grad is fine: the fill runs under ``torch.no_grad()``).
        a, b: the bounds, finite, ``a < b``, within the dtype's range.
        threshold: values of magnitude below it become zero; ``a < -threshold`` or ``b > threshold`` is
            required (otherwise every value would be zero, which is reported as an error).
        generator: draw the seed from this generator instead of the device's default one.
        seed: fill deterministically: the values depend only on (seed, shape, dtype), bit for bit the
            same on CPU and CUDA and for any thread count. Exclusive with ``generator``.

    Without ``seed``, ``torch.manual_seed`` makes the fill reproducible and each call draws fresh values.
    The pure-PyTorch fallback (``customlayers.reference.masked_uniform_op``) has the same distribution but
    other values.
    """
    if seed is not None and generator is not None:
        raise ValueError("masked_uniform_: pass either seed or generator, not both")
    if generator is not None and generator.device.type != tensor.device.type:
        raise RuntimeError(f"masked_uniform_: expected a generator on {tensor.device.type}, like the tensor, but "
                           f"got one on {generator.device}")
    seed = None if seed is None else _seed_arg(seed)
    if generator is not None:
        seed = int(torch.empty((), dtype=torch.int64, device=generator.device).random_(generator=generator))
    # no_grad only where autograd tracks the tensor: entering it costs more than filling 1K values.
    with torch.no_grad() if tensor.requires_grad and torch.is_grad_enabled() else contextlib.nullcontext():
        _MASKED_UNIFORM(tensor, float(a), float(b), float(threshold), seed, 0)
    return tensor


_MASKED_UNIFORM = _ops.op("masked_uniform_")


def my_init(module: nn.Module, *, verbose: bool = False) -> None:
    """The book's ``my_init`` for ``net.apply``: ``masked_uniform_(module.weight)`` on linear layers only,
    like the book's (which tests ``type(m) == nn.Linear``): ``nn.Linear`` and its subclasses (LinearReLU
    included) and MyLinear. Other modules (a LayerNorm's weight, a convolution) and uninitialized lazy
    layers are left alone; biases too.

    Quiet by default. ``verbose=True`` prints the book's line per layer, e.g. ``Init weight torch.Size([8, 4])``;
    ``net.apply`` passes one argument, so use ``net.apply(functools.partial(my_init, verbose=True))``.
    """
    from .nn import MyLinear  # (customlayers.nn imports this module)
    weight = module.weight if isinstance(module, (nn.Linear, MyLinear)) else None
    if weight is None or nn.parameter.is_lazy(weight):
        return
    if verbose:
        print("Init", "weight", weight.shape)
    masked_uniform_(weight)


@torch.no_grad()
def linear_(weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, transposed: bool = False) -> None:
    """nn.Linear's default initialization, in place: weight ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform
    with a=sqrt(5)), and bias ~ U(-1/sqrt(in), 1/sqrt(in)).

    ``weight`` is (out_features, in_features) like nn.Linear's, or with ``transposed=True`` (in_features,
    out_features) like the book's MyLinear. Both draw the same random numbers in the same order, so under
    the same seed a transposed weight equals ``nn.Linear(in, out).weight.t()``.
    """
    if weight.numel():  # (kaiming_uniform_ warns that filling a zero-element tensor is a no-op)
        if transposed:
            drawn = torch.empty(weight.shape[::-1], dtype=weight.dtype, device=weight.device)
            nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))
            weight.copy_(drawn.t())
        else:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[0] if transposed else weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
