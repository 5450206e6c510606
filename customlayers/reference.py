"""Pure-PyTorch implementations of every op: the ground truth the tests compare the kernels with, and the
fallback, registered as the ops' kernels where no compiled kernel serves (customlayers/_ops.py). Each
function with an op's name takes that op's arguments and checks them itself, raising the exception types
of the compiled kernels (whose checks are the authority; the messages may differ)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["centered", "linear_act", "linear_act_backward", "masked_uniform_", "masked_uniform_op"]

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_floating(t: torch.Tensor, op: str, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {arg} to be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATING:
        raise TypeError(f"{op}: expected {arg} to be a floating-point tensor (float32, float64, float16 or "
                        f"bfloat16), but got dtype {t.dtype}")
    if t.layout != torch.strided:
        raise RuntimeError(f"{op}: expected {arg} to be a strided (dense) tensor, but got layout {t.layout}")


def centered(x: torch.Tensor, dim: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``x - x.mean()`` (the book's CenteredLayer), or ``x - x.mean(dim, keepdim=True)``."""
    _check_floating(x, "centered", "x")
    if dim is None or len(dim) == 0:
        return x - x.mean()
    return x - x.mean(dim=tuple(dim), keepdim=True)


def masked_uniform_(w: torch.Tensor, a: float = -10.0, b: float = 10.0, threshold: float = 5.0,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The book's initializer, in place: ``uniform_(w, a, b)`` then ``w *= w.abs() >= threshold``."""
    w.uniform_(a, b, generator=generator)
    w *= w.abs() >= threshold
    return w


def masked_uniform_op(self: torch.Tensor, low: float = -10.0, high: float = 10.0, threshold: float = 5.0,
                      seed: Optional[int] = None, offset: int = 0) -> None:
    """The masked_uniform_ op on the book's code: the same distribution as the kernels, other values. A seed
    (with its offset) seeds a generator of its own; without one the device's default generator draws.
    Unlike the kernels, bounds between two values of a 16-bit dtype are not refused."""
    op = "masked_uniform_"
    _check_floating(self, op, "tensor")
    if not all(math.isfinite(v) for v in (low, high, threshold)):
        raise ValueError(f"{op}: expected finite bounds and threshold, but got low={low:g}, high={high:g}, "
                         f"threshold={threshold:g}")
    if not low < high:
        raise ValueError(f"{op}: expected low < high, but got low={low:g}, high={high:g}")
    if not threshold >= 0:
        raise ValueError(f"{op}: expected threshold >= 0, but got {threshold:g}")
    if offset < 0:
        raise ValueError(f"{op}: expected offset >= 0, but got {offset}")
    largest = torch.finfo(self.dtype).max
    if max(-low, high) > largest or high - low > largest:
        name = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float"}.get(self.dtype, "Double")
        raise ValueError(f"{op}: the bounds [{low:g}, {high:g}] exceed the {name} range (largest finite "
                         f"value {largest:g}, also for high - low)")
    if not (high > threshold or low < -threshold):
        raise ValueError(f"{op}: threshold={threshold:g} masks every value of [{low:g}, {high:g}): expected "
                         "low < -threshold or high > threshold")
    generator = None
    if seed is not None:
        generator = torch.Generator(self.device).manual_seed(hash((seed, offset)) & ((1 << 63) - 1))
    masked_uniform_(self, low, high, threshold, generator)


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str, op: str) -> None:
    """linear_act's argument checks, in the compiled kernels' order (csrc/common/linear_act.cpp): dtypes
    (TypeError), devices, shapes (RuntimeError), act (ValueError)."""
    tensors = (("weight", weight), ("bias", bias))
    _check_floating(x, op, "x")
    for name, t in tensors:
        if t is not None:
            _check_floating(t, op, name)
            if t.dtype != x.dtype:
                raise TypeError(f"{op}: expected x and {name} to have the same dtype, but x is {x.dtype} and "
                                f"{name} is {t.dtype}")
    for name, t in tensors:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: expected all tensors on one device, but x is on {x.device} and {name} is "
                               f"on {t.device}")
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: expected weight to be 2-D (in_features, out_features), but got shape "
                           f"{list(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise RuntimeError(f"{op}: x's last dimension must equal weight's in_features (weight.shape[0]), but x "
                           f"has shape {list(x.shape)} and weight has shape {list(weight.shape)} (x needs at "
                           "least 1 dimension)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[1]):
        raise RuntimeError(f"{op}: expected bias of shape [{weight.shape[1]}] (out_features,), but got shape "
                           f"{list(bias.shape)}")
    if act not in ("relu", "none"):
        raise ValueError(f"{op}: act must be 'relu' or 'none', but got '{act}'")


def linear_grad_weight_like(weight: torch.Tensor) -> torch.Tensor:
    """An uninitialized weight gradient in the layout the kernels give it (common/linear_act.cpp's
    weight_grad_strides): weight's own, so a transposed view such as nn.Linear.weight.t() gets a
    transposed gradient."""
    k, n = weight.shape
    if weight.stride(0) == 1 and weight.stride(1) != 1:
        return weight.new_empty((n, k)).t()
    return weight.new_empty((k, n))


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               act: str = "relu") -> torch.Tensor:
    """``torch.relu(x @ weight + bias)`` (the book's MyLinear), weight (in_features, out_features);
    act='none' leaves out the ReLU."""
    check_linear(x, weight, bias, act, "linear_act")
    y = x @ weight
    if bias is not None:
        y = y + bias
    return torch.relu(y) if act == "relu" else y


def linear_act_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor],
                        act: str, output_mask: List[bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dweight, dbias) of linear_act for the inputs output_mask selects (None for the others), with
    torch.relu's derivative (the gradient passes where out is not <= 0); dweight in weight's layout."""
    op = "linear_act_backward"
    check_linear(x, weight, None, act, op)
    for name, t in (("grad", grad), ("out", out)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: expected {name} and x to have the same dtype, but {name} is {t.dtype} and x "
                            f"is {x.dtype}")
    if grad.shape != (*x.shape[:-1], weight.shape[1]):
        raise RuntimeError(f"{op}: expected grad of shape {[*x.shape[:-1], weight.shape[1]]}, but got shape "
                           f"{list(grad.shape)}")
    if act == "relu":
        if out is None or out.shape != grad.shape:
            raise RuntimeError(f"{op}: act='relu' needs the forward output `out` of shape {list(grad.shape)}")
        grad = torch.where(out <= 0, 0, grad)
    k, n = weight.shape
    g2, x2 = grad.reshape(-1, n), x.reshape(-1, k)
    dx = (grad @ weight.t()) if output_mask[0] else None
    dw = linear_grad_weight_like(weight).copy_(x2.t() @ g2) if output_mask[1] else None
    db = g2.sum(0) if output_mask[2] else None
    return dx, dw, db
