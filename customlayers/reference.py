"""Pure-PyTorch implementations of every op: the ground truth the tests compare the kernels with, and the
fallback, registered as the ops' kernels where no compiled kernel serves (customlayers/_ops.py). Each
function with an op's name takes that op's arguments and checks them itself, raising the exception types
of the compiled kernels (whose checks are the authority; the messages may differ)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from . import _activations

__all__ = ["centered", "linear_act", "linear_act_backward", "masked_uniform_", "masked_uniform_op"]

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(t, op: str, arg: str) -> None:
    """A Tensor argument: anything else is refused as the op's schema refuses it (RuntimeError)."""
    if not isinstance(t, torch.Tensor):
        raise RuntimeError(f"{op}: expected a value of type 'Tensor' for argument '{arg}' but instead found type "
                           f"'{type(t).__name__}'")


def check_floating(t: torch.Tensor, op: str, arg: str) -> None:
    """common/checks.cpp's check_floating: a floating-point dtype (TypeError), a strided layout
    (NotImplementedError, as the dispatcher refuses sparse tensors where a compiled kernel serves)."""
    check_tensor(t, op, arg)
    torch._check_type(t.dtype in _FLOATING, lambda: f"{op}: expected {arg} to be a floating-point tensor (float32, "
                      f"float64, float16 or bfloat16), but got dtype {t.dtype}")
    torch._check_not_implemented(t.layout == torch.strided, lambda: f"{op}: expected {arg} to be a strided (dense) "
                                 f"tensor, but got layout {t.layout}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """All tensors given (None skipped) on one device (RuntimeError), as common/checks.cpp checks it."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first = name, t
            continue
        torch._check(t.device == first[1].device, lambda: f"{op}: expected all tensors on one device, but "
                     f"{first[0]} is on {first[1].device} and {name} is on {t.device}")


def check_dims(x: torch.Tensor, dim: Optional[Sequence[int]], op: str) -> None:
    """common/checks.cpp's reduced_dims_mask: each dim in range (IndexError) and named once (RuntimeError),
    a 0-dim tensor's too (0 and -1 name its one dim)."""
    if dim is None:
        return
    wrap = max(x.dim(), 1)
    seen = set()
    for d in dim:
        torch._check_index(-wrap <= d < wrap, lambda: f"{op}: dim {d} is out of range for a tensor with {x.dim()} "
                           f"dimension(s) (expected a value in [{-wrap}, {wrap - 1}])")
        w = d % wrap
        torch._check(w not in seen, lambda: f"{op}: dim {w} appears more than once in dim={list(dim)}")
        seen.add(w)


def centered(x: torch.Tensor, dim: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``x - x.mean()`` (the book's CenteredLayer), or ``x - x.mean(dim, keepdim=True)``."""
    check_floating(x, "centered", "x")
    check_dims(x, dim, "centered")
    if dim is None or len(dim) == 0:
        return x - x.mean()
    return x - x.mean(dim=tuple(dim), keepdim=True)


def masked_uniform_(w: torch.Tensor, a: float = -10.0, b: float = 10.0, threshold: float = 5.0,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The book's initializer, in place: ``uniform_(w, a, b)`` then ``w *= w.abs() >= threshold``."""
    w.uniform_(a, b, generator=generator)
    w *= w.abs() >= threshold
    return w


def check_masked_uniform(self: torch.Tensor, low: float, high: float, threshold: float, offset: int) -> None:
    """masked_uniform_'s argument checks (common/masked_uniform.cpp), those not about rounding to the dtype."""
    op = "masked_uniform_"
    check_floating(self, op, "tensor")
    torch._check(torch._debug_has_internal_overlap(self) != 1, lambda: f"{op}: tensor has elements that share "
                 "memory (e.g. an expanded tensor): it cannot be filled in place; fill a clone")
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
    torch._check(not self.is_inference() or torch.is_inference_mode_enabled(), lambda: f"{op}: cannot update "
                 "tensor in place: it is an inference tensor and InferenceMode is off (as for torch's in-place ops); "
                 "call it under torch.inference_mode(), or on a clone")


def masked_uniform_op(self: torch.Tensor, low: float = -10.0, high: float = 10.0, threshold: float = 5.0,
                      seed: Optional[int] = None, offset: int = 0) -> None:
    """The masked_uniform_ op on the book's code: the same distribution as the kernels, other values. A seed
    (with its offset) seeds a generator of its own; without one the device's default generator draws.
    Unlike the kernels, bounds between two values of a 16-bit dtype are not refused."""
    check_masked_uniform(self, low, high, threshold, offset)
    generator = None
    if seed is not None:
        generator = torch.Generator(self.device).manual_seed(hash((seed, offset)) & ((1 << 63) - 1))
    masked_uniform_(self, low, high, threshold, generator)


def check_act(act, op: str) -> None:
    """act: a str (else RuntimeError, as the op's schema refuses it), one of customlayers._activations.NAMES
    (ValueError)."""
    if not isinstance(act, str):
        raise RuntimeError(f"{op}: expected a value of type 'str' for argument 'act' but instead found type "
                           f"'{type(act).__name__}'")
    torch._check_value(act in _activations.ACTIVATIONS, lambda: f"{op}: act must be one of "
                       f"{_activations.names_text()}, but got '{act}'")


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], op: str,
                 weight_t: bool = False, weight_name: str = "weight", bias_name: str = "bias") -> None:
    """linear_act's tensor checks, in the compiled kernels' order (csrc/common/linear_act.cpp's
    check_linear_inputs): dtypes (TypeError), devices, shapes (RuntimeError); weight (in, out), or (out, in)
    with weight_t. torch._check* keeps them usable on symbolic shapes (the fake implementations call them)."""
    in_dim = 1 if weight_t else 0
    check_floating(x, op, "x")
    check_floating(weight, op, weight_name)
    if bias is not None:
        check_floating(bias, op, bias_name)
    for name, t in ((weight_name, weight), (bias_name, bias)):
        torch._check_type(t is None or t.dtype == x.dtype, lambda: f"{op}: expected x and {name} to have the same "
                          f"dtype, but x is {x.dtype} and {name} is {t.dtype}")
    check_same_device(op, **{"x": x, weight_name: weight, bias_name: bias})
    layout = "(out_features, in_features)" if weight_t else "(in_features, out_features)"
    torch._check(weight.dim() == 2, lambda: f"{op}: expected {weight_name} to be 2-D {layout}, but got shape "
                 f"{list(weight.shape)}")
    torch._check(x.dim() >= 1, lambda: f"{op}: expected x to have at least 1 dimension (*, in_features), but got "
                 f"shape {list(x.shape)}")
    torch._check(x.shape[-1] == weight.shape[in_dim], lambda: f"{op}: x's last dimension must equal {weight_name}'s "
                 f"in_features ({weight_name}.shape[{in_dim}]), but x has shape {list(x.shape)} and {weight_name} "
                 f"has shape {list(weight.shape)}")
    torch._check(bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[1 - in_dim]), lambda: f"{op}: "
                 f"expected {bias_name} of shape [{weight.shape[1 - in_dim]}] (out_features,), but got shape "
                 f"{list(bias.shape)}")


def check_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor],
                          act: str) -> None:
    """linear_act_backward's checks, in the order of csrc/common/linear_act.cpp's
    check_linear_backward_inputs: x and weight as linear_act's, act, then grad's and out's dtype, device
    and shape."""
    op = "linear_act_backward"
    check_linear(x, weight, None, op)
    check_act(act, op)
    check_floating(grad, op, "grad")
    torch._check_type(grad.dtype == x.dtype, lambda: f"{op}: expected grad and x to have the same dtype, but grad "
                      f"is {grad.dtype} and x is {x.dtype}")
    saves = _activations.ACTIVATIONS[act].saves
    uses_out = saves != "nothing"
    if uses_out and out is not None:
        check_tensor(out, op, "out")
    check_same_device(op, x=x, grad=grad, out=out if uses_out else None)
    shape = [*x.shape[:-1], weight.shape[1]]
    torch._check(list(grad.shape) == shape, lambda: f"{op}: expected grad of shape {shape} (x's shape with "
                 f"out_features last), but got shape {list(grad.shape)}")
    if uses_out:
        what = "the forward's output" if saves == "output" else "the pre-activation x @ weight + bias"
        torch._check(out is not None, lambda: f"{op}: act='{act}' needs `out`: {what}")
        torch._check_type(out.dtype == x.dtype, lambda: f"{op}: expected out and x to have the same dtype, but out "
                          f"is {out.dtype} and x is {x.dtype}")
        torch._check(out.shape == grad.shape, lambda: f"{op}: expected out of shape {list(grad.shape)}, but got "
                     f"shape {list(out.shape)}")


def linear_grad_weight_like(weight: torch.Tensor) -> torch.Tensor:
    """An uninitialized weight gradient in the layout the kernels give it (common/linear_act.cpp's
    weight_grad_strides): weight's own, so a transposed view such as nn.Linear.weight.t() gets a
    transposed gradient."""
    k, n = weight.shape
    if weight.stride(0) == 1 and weight.stride(1) != 1:
        return weight.new_empty((n, k)).t()
    return weight.new_empty((k, n))


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               act: str = "relu", weight_t: bool = False) -> torch.Tensor:
    """``act(x @ weight + bias)`` with torch's activation (act='relu': the book's MyLinear), weight
    (in_features, out_features), or with weight_t (out_features, in_features) (nn.Linear's: ``x @ weight.t()``)."""
    check_linear(x, weight, bias, "linear_act", weight_t)
    check_act(act, "linear_act")
    y = x @ (weight.t() if weight_t else weight)
    if bias is not None:
        y = y + bias
    return _activations.apply(act, y)


def linear_act_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor],
                        act: str, output_mask: List[bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dweight, dbias) of linear_act for the inputs output_mask selects (None for the others), with
    torch's derivative of act from `out` (the forward's output for relu, tanh, sigmoid; the pre-activation
    for gelu, gelu_tanh, silu); dweight in weight's layout."""
    check_linear_backward(grad, x, weight, out, act)
    grad = _activations.derivative(act, grad, out)
    k, n = weight.shape
    m = math.prod(x.shape[:-1])  # not -1: a reshape cannot infer it from zero elements
    g2, x2 = grad.reshape(m, n), x.reshape(m, k)
    dx = (grad @ weight.t()) if output_mask[0] else None
    dw = linear_grad_weight_like(weight).copy_(x2.t() @ g2) if output_mask[1] else None
    db = g2.sum(0) if output_mask[2] else None
    return dx, dw, db


# ------------------------------------------------------------------------------------------ linear_glu

def _check_glu_weights(weight_gate: torch.Tensor, weight_up: torch.Tensor, op: str) -> None:
    torch._check(weight_gate.shape == weight_up.shape, lambda: f"{op}: expected weight_gate and weight_up to have "
                 f"the same shape, but weight_gate has shape {list(weight_gate.shape)} and weight_up has shape "
                 f"{list(weight_up.shape)}")


def check_linear_glu(x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor,
                     bias_gate: Optional[torch.Tensor], bias_up: Optional[torch.Tensor], act, weight_t: bool) -> None:
    """linear_glu's checks, in the order of csrc/common/linear_glu.cpp's prepare_forward."""
    op = "linear_glu"
    check_linear(x, weight_gate, bias_gate, op, weight_t, "weight_gate", "bias_gate")
    check_linear(x, weight_up, bias_up, op, weight_t, "weight_up", "bias_up")
    _check_glu_weights(weight_gate, weight_up, op)
    check_act(act, op)


def check_linear_glu_backward(grad: torch.Tensor, x: torch.Tensor, weight_gate: torch.Tensor,
                              weight_up: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act) -> None:
    """linear_glu_backward's checks, in the order of csrc/common/linear_glu.cpp's prepare_backward."""
    op = "linear_glu_backward"
    check_linear(x, weight_gate, None, op, weight_name="weight_gate")
    check_linear(x, weight_up, None, op, weight_name="weight_up")
    _check_glu_weights(weight_gate, weight_up, op)
    check_act(act, op)
    check_floating(grad, op, "grad")
    torch._check_type(grad.dtype == x.dtype, lambda: f"{op}: expected grad and x to have the same dtype, but grad "
                      f"is {grad.dtype} and x is {x.dtype}")
    check_same_device(op, x=x, grad=grad, gate=gate, up=up)
    shape = [*x.shape[:-1], weight_gate.shape[1]]
    torch._check(list(grad.shape) == shape, lambda: f"{op}: expected grad of shape {shape} (x's shape with "
                 f"hidden_features last), but got shape {list(grad.shape)}")
    for name, t in (("gate", gate), ("up", up)):
        check_floating(t, op, name)
        torch._check_type(t.dtype == x.dtype, lambda: f"{op}: expected {name} and x to have the same dtype, but "
                          f"{name} is {t.dtype} and x is {x.dtype}")
        torch._check(t.shape == grad.shape, lambda: f"{op}: expected {name} of shape {list(grad.shape)} (grad's), "
                     f"but got shape {list(t.shape)}")


def linear_glu(x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor,
               bias_gate: Optional[torch.Tensor] = None, bias_up: Optional[torch.Tensor] = None,
               act: str = "silu", weight_t: bool = False) -> torch.Tensor:
    """``act(x @ weight_gate + bias_gate) * (x @ weight_up + bias_up)`` with torch's activation, the weights
    (in_features, hidden_features), or with weight_t (hidden_features, in_features) (nn.Linear's)."""
    check_linear_glu(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t)
    gate = linear_act(x, weight_gate, bias_gate, "none", weight_t)
    return _activations.apply(act, gate) * linear_act(x, weight_up, bias_up, "none", weight_t)


def linear_glu_forward(x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor,
                       bias_gate: Optional[torch.Tensor] = None, bias_up: Optional[torch.Tensor] = None,
                       act: str = "silu", weight_t: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(linear_glu's output, gate, up): the pre-activations x @ weight_gate + bias_gate and x @ weight_up +
    bias_up too."""
    check_linear_glu(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t)
    gate = linear_act(x, weight_gate, bias_gate, "none", weight_t)
    up = linear_act(x, weight_up, bias_up, "none", weight_t)
    return _activations.apply(act, gate) * up, gate, up


def linear_glu_backward(grad: torch.Tensor, x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor,
                        gate: torch.Tensor, up: torch.Tensor, act: str,
                        output_mask: List[bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dweight_gate, dweight_up, dbias_gate, dbias_up) of linear_glu for the inputs output_mask selects
    (None for the others), from the pre-activations gate and up; the weights' gradients in their layouts."""
    check_linear_glu_backward(grad, x, weight_gate, weight_up, gate, up, act)
    a = _activations.apply(act, gate)
    saved = a if _activations.saves_output(act) else gate
    dgate, dup = _activations.derivative(act, grad * up, saved), grad * a
    k, n = weight_gate.shape
    m = math.prod(x.shape[:-1])
    x2, dgate2, dup2 = x.reshape(m, k), dgate.reshape(m, n), dup.reshape(m, n)
    dx = dgate @ weight_gate.t() + dup @ weight_up.t() if output_mask[0] else None
    dwg = linear_grad_weight_like(weight_gate).copy_(x2.t() @ dgate2) if output_mask[1] else None
    dwu = linear_grad_weight_like(weight_up).copy_(x2.t() @ dup2) if output_mask[2] else None
    dbg = dgate2.sum(0) if output_mask[3] else None
    dbu = dup2.sum(0) if output_mask[4] else None
    return dx, dwg, dwu, dbg, dbu
