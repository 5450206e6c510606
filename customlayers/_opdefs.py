"""Every op of customlayers as one entry, which the rest iterate over:

- its schema, written once in customlayers/schemas.def (csrc/ops.cpp defines the ops from the same file);
- its reference: the pure-PyTorch implementation (customlayers.reference), which serves as the fallback
  and is the tests' ground truth;
- its fake: the output metadata for torch.compile, torch.export and meta tensors. A fake checks what the
  kernel checks about dtypes, layouts, devices and shapes (through the references' checks, in the kernels'
  order and with their exception types), so that a bad call fails at trace time as it would when run. The
  kernels' own checks (csrc/common) stay the authority, and are the only ones on values;
- whether autocast casts its floating inputs to the autocast dtype (as nn.Linear's are);
- the calls the tests make of every op: ``samples`` (valid calls, for torch.library.opcheck) and
  ``bad_inputs`` (calls that each implementation must refuse with the same exception type).

customlayers._ops registers the schemas, references and fakes from here; tests/test_ops.py and
tests/test_errors.py run the samples and bad inputs. A new op is its schema, one entry here and its kernels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

from . import _activations, reference

SCHEMA_FILE = Path(__file__).with_name("schemas.def")


def read_schemas(path: Path = SCHEMA_FILE) -> Dict[str, str]:
    """name -> schema, from the CUSTOMLAYERS_OP(name, "schema" ...) lines of schemas.def (comments and
    C++'s adjacent string literals as the C++ compiler reads them)."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    schemas = {}
    for name, literals in re.findall(r'CUSTOMLAYERS_OP\(\s*(\w+)\s*,\s*((?:"[^"]*"\s*)+)\)', text):
        schemas[name] = "".join(re.findall(r'"([^"]*)"', literals))
    return schemas


Args = Callable[[str], Tuple[tuple, dict]]  # device -> (args, kwargs)


@dataclass(frozen=True)
class OpDef:
    name: str
    reference: Callable
    fake: Callable
    samples: Dict[str, Args]  # id -> the call's arguments on a device
    bad_inputs: Dict[str, Tuple[Callable[[], tuple], type]]  # id -> (the arguments, on the CPU; exception type)
    autocast: bool = False
    schema: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "schema", _SCHEMAS[self.name])


_SCHEMAS = read_schemas()


# ---------------------------------------------------------------------------------- shared test inputs

def _x():
    return torch.randn(3, 4)


def _w():
    return torch.randn(4, 5)


def _g():
    return torch.randn(3, 5)


def _inference():
    with torch.inference_mode():
        return torch.zeros(4, 5)


def _numpy(shape):
    import numpy as np  # only when the case is built: torch does not need numpy
    return np.ones(shape, np.float32)


def _float64(device, *shape):
    return torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)


# ------------------------------------------------------------------------------------------ centered

def _centered_fake(x, dim=None):
    reference.check_floating(x, "centered", "x")
    reference.check_dims(x, dim, "centered")
    return torch.empty_like(x)


def _centered_samples() -> Dict[str, Args]:
    samples = {}
    for shape, dim in (((3, 5), None), ((3, 5), [1]), ((2, 3, 4), [0, 2]), ((0, 3), [0]), ((), None)):
        samples[f"{shape}-{dim}"] = lambda d, shape=shape, dim=dim: ((_float64(d, *shape), dim), {})
        samples[f"{shape}-{dim}-float32"] = lambda d, shape=shape, dim=dim: (
            (torch.randn(shape, device=d), dim), {})
    samples["transposed"] = lambda d: ((torch.randn(5, 3, device=d).t(), [1]), {})
    return samples


CENTERED = OpDef(
    name="centered", reference=reference.centered, fake=_centered_fake, samples=_centered_samples(),
    bad_inputs={
        "int": (lambda: (torch.arange(6), None), TypeError),
        "bool": (lambda: (torch.ones(3, dtype=torch.bool), None), TypeError),
        "complex": (lambda: (torch.randn(3, dtype=torch.cfloat), None), TypeError),
        "sparse": (lambda: (_x().to_sparse(), None), NotImplementedError),
        "numpy": (lambda: (_numpy(3), None), RuntimeError),
        "dim-range": (lambda: (_x(), [2]), IndexError),
        "dim-negative-range": (lambda: (_x(), [-3]), IndexError),
        "dim-repeated": (lambda: (_x(), [1, -1]), RuntimeError),
        "0dim-repeated": (lambda: (torch.tensor(1.0), [0, 0]), RuntimeError),
        "0dim-repeated-negative": (lambda: (torch.tensor(1.0), [0, -1]), RuntimeError),
        "0dim-range": (lambda: (torch.tensor(1.0), [1]), IndexError),
    })


# ----------------------------------------------------------------------------------- masked_uniform_

def _masked_uniform_fake(self, low=-10.0, high=10.0, threshold=5.0, seed=None, offset=0):
    reference.check_masked_uniform(self, low, high, threshold, offset)


MASKED_UNIFORM = OpDef(
    name="masked_uniform_", reference=reference.masked_uniform_op, fake=_masked_uniform_fake,
    # With no seed each run draws fresh values, and opcheck's runs could not agree: every sample has one.
    samples={
        "contiguous": lambda d: ((torch.empty(6, 5, device=d, dtype=torch.float64), -2.0, 3.0, 0.5, 1234, 8), {}),
        "transposed": lambda d: ((torch.empty(5, 6, device=d).t(), -2.0, 3.0, 0.5, 1234, 8), {}),
        "half": lambda d: ((torch.empty(33, device=d, dtype=torch.float16), -2.0, 3.0, 0.5, 1234, 8), {}),
        "empty": lambda d: ((torch.empty(0, 3, device=d), -2.0, 3.0, 0.5, 1234, 8), {}),
        "defaults": lambda d: ((torch.empty(7, device=d),), {"seed": 99}),
    },
    bad_inputs={
        "int": (lambda: (torch.zeros(3, dtype=torch.long), -10, 10, 5, 0), TypeError),
        "sparse": (lambda: (torch.zeros(3, 3).to_sparse(), -10, 10, 5, 0), NotImplementedError),
        "numpy": (lambda: (_numpy(3), -10, 10, 5, 0), RuntimeError),
        "low-high": (lambda: (torch.zeros(3), 10, -10, 5, 0), ValueError),
        "nan": (lambda: (torch.zeros(3), float("nan"), 10, 5, 0), ValueError),
        "inf": (lambda: (torch.zeros(3), -10, float("inf"), 5, 0), ValueError),
        "threshold": (lambda: (torch.zeros(3), -10, 10, -1, 0), ValueError),
        "masks-all": (lambda: (torch.zeros(3), -1, 1, 5, 0), ValueError),
        "offset": (lambda: (torch.zeros(3), -10, 10, 5, 0, -1), ValueError),
        "half-range": (lambda: (torch.zeros(3).half(), -1e5, 1e5, 5, 0), ValueError),
        "range-overflow": (lambda: (torch.zeros(3), -3e38, 3e38, 0.0, 0), ValueError),
        "range-overflow-double": (lambda: (torch.zeros(3).double(), -1e308, 1e308, 0.0, 0), ValueError),
        "overlapping": (lambda: (torch.zeros(1).expand(4), -10, 10, 5, 0), RuntimeError),
        "inference-tensor": (lambda: (_inference(), -10, 10, 5, 0), RuntimeError),
    })


# ---------------------------------------------------------------------------------------- linear_act

def _linear_act_fake(x, weight, bias=None, act="relu", weight_t=False):
    reference.check_linear(x, weight, bias, "linear_act", weight_t)
    reference.check_act(act, "linear_act")
    return x.new_empty((*x.shape[:-1], weight.shape[0 if weight_t else 1]))


def _linear_inputs(device, shape, k, n, bias, weight_t):
    """x (*shape), the weight (k, n) (or (n, k) with weight_t) and the bias (n,) or None, float64."""
    return (_float64(device, *shape), _float64(device, *((n, k) if weight_t else (k, n))),
            _float64(device, n) if bias else None)


# (x's shape, in, out, bias, act, weight_t)
_LINEAR_CASES = (((3, 5), 5, 4, True, "relu", False), ((2, 3, 5), 5, 4, False, "none", False),
                 ((1, 1), 1, 1, True, "relu", True), ((0, 3), 3, 2, True, "relu", False),
                 *(((3, 5), 5, 4, True, act, False) for act in _activations.NAMES[2:]),
                 *(((2, 3, 4), 4, 5, bias, act, True) for act in _activations.NAMES for bias in (False, True)))


def _linear_act_samples() -> Dict[str, Args]:
    def sample(device, case):
        shape, k, n, bias, act, weight_t = case
        return (*_linear_inputs(device, shape, k, n, bias, weight_t), act, weight_t), {}
    return {str(case): lambda d, case=case: sample(d, case) for case in _LINEAR_CASES}


LINEAR_ACT = OpDef(
    name="linear_act", reference=reference.linear_act, fake=_linear_act_fake, samples=_linear_act_samples(),
    autocast=True,
    bad_inputs={
        "int-x": (lambda: (_x().long(), _w(), None), TypeError),
        "int-bias": (lambda: (_x(), _w(), torch.ones(5, dtype=torch.long)), TypeError),
        "dtype-weight": (lambda: (_x(), _w().double(), None), TypeError),
        "dtype-bias": (lambda: (_x(), _w(), torch.randn(5).half()), TypeError),
        "sparse-x": (lambda: (_x().to_sparse(), _w(), None), NotImplementedError),
        "sparse-weight": (lambda: (_x(), _w().to_sparse(), None), NotImplementedError),
        "sparse-bias": (lambda: (_x(), _w(), torch.randn(5).to_sparse()), NotImplementedError),
        "numpy-weight": (lambda: (_x(), _numpy((4, 5)), None), RuntimeError),
        "act-None": (lambda: (_x(), _w(), None, None), RuntimeError),
        "act-unknown": (lambda: (_x(), _w(), None, "swish"), ValueError),
        "weight-1d": (lambda: (_x(), torch.randn(4), None), RuntimeError),
        "x-0d": (lambda: (torch.tensor(1.0), _w(), None), RuntimeError),
        "in-features": (lambda: (_x(), torch.randn(5, 4), None), RuntimeError),
        "bias-shape": (lambda: (_x(), _w(), torch.randn(4)), RuntimeError),
        "bias-2d": (lambda: (_x(), _w(), torch.randn(1, 5)), RuntimeError),
        "weight_t-in-features": (lambda: (_x(), _w(), None, "relu", True), RuntimeError),
        "weight_t-bias-shape": (lambda: (_x(), _w().t(), torch.randn(4), "relu", True), RuntimeError),
        "meta-x": (lambda: (_x().to("meta"), _w(), None), RuntimeError),
        "meta-bias": (lambda: (_x(), _w(), torch.randn(5, device="meta")), RuntimeError),
    })


def _linear_act_backward_fake(grad, x, weight, out, act, output_mask):
    reference.check_linear_backward(grad, x, weight, out, act)
    return (x.new_empty(x.shape) if output_mask[0] else None,
            reference.linear_grad_weight_like(weight) if output_mask[1] else None,
            x.new_empty((weight.shape[1],)) if output_mask[2] else None)


def _linear_act_backward_samples() -> Dict[str, Args]:
    def sample(device, case, mask):
        shape, k, n, bias, act, weight_t = case
        x, weight, b = (t.detach() if t is not None else None
                        for t in _linear_inputs(device, shape, k, n, bias, weight_t))
        w = weight.t() if weight_t else weight  # the backward takes W (in, out)
        saves = _activations.ACTIVATIONS[act].saves
        out = None if saves == "nothing" else reference.linear_act(x, w, b, act if saves == "output" else "none")
        grad = torch.randn((*shape[:-1], n), dtype=x.dtype, device=device)
        return (grad, x, w, out, act, mask), {}
    return {f"{case}-{mask}": lambda d, case=case, mask=mask: sample(d, case, mask)
            for case in _LINEAR_CASES for mask in ([True, True, True], [False, True, False], [True, False, case[3]])}


_MASK = [True, True, True]
LINEAR_ACT_BACKWARD = OpDef(
    name="linear_act_backward", reference=reference.linear_act_backward, fake=_linear_act_backward_fake,
    samples=_linear_act_backward_samples(),
    bad_inputs={
        "grad-shape": (lambda: (torch.randn(3, 4), _x(), _w(), _g(), "relu", _MASK), RuntimeError),
        "out-shape": (lambda: (_g(), _x(), _w(), torch.randn(3, 4), "relu", _MASK), RuntimeError),
        "out-missing": (lambda: (_g(), _x(), _w(), None, "relu", _MASK), RuntimeError),
        "grad-dtype": (lambda: (_g().double(), _x(), _w(), _g(), "relu", _MASK), TypeError),
        "grad-int": (lambda: (_g().long(), _x(), _w(), _g(), "relu", _MASK), TypeError),
        "out-dtype": (lambda: (_g(), _x(), _w(), _g().half(), "relu", _MASK), TypeError),
        "act-unknown": (lambda: (_g(), _x(), _w(), _g(), "swish", _MASK), ValueError),
        "x-weight-mismatch": (lambda: (_g(), _x(), torch.randn(5, 5), _g(), "relu", _MASK), RuntimeError),
        "meta-grad": (lambda: (_g().to("meta"), _x(), _w(), _g(), "relu", _MASK), RuntimeError),
        "meta-out": (lambda: (_g(), _x(), _w(), _g().to("meta"), "relu", _MASK), RuntimeError),
        "meta-x-weight": (lambda: (_g(), _x().to("meta"), _w().to("meta"), _g(), "relu", _MASK), RuntimeError),
        "sparse-grad": (lambda: (_g().to_sparse(), _x(), _w(), _g(), "relu", _MASK), NotImplementedError),
    })


# ---------------------------------------------------------------------------------------- linear_glu

def _linear_glu_fake(x, weight_gate, weight_up, bias_gate=None, bias_up=None, act="silu", weight_t=False):
    reference.check_linear_glu(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t)
    return x.new_empty((*x.shape[:-1], weight_gate.shape[0 if weight_t else 1]))


# (x's shape, in, hidden, biases, act, weight_t)
_GLU_CASES = (((3, 5), 5, 4, True, "silu", False), ((2, 3, 5), 5, 4, False, "gelu", True),
              ((1, 1), 1, 1, True, "relu", True), ((0, 3), 3, 2, True, "silu", False),
              ((4, 0), 0, 3, True, "gelu_tanh", False),
              *(((3, 5), 5, 4, True, act, True) for act in _activations.NAMES))


def _glu_inputs(device, shape, k, n, bias, weight_t):
    x, wg, bg = _linear_inputs(device, shape, k, n, bias, weight_t)
    _, wu, bu = _linear_inputs(device, shape, k, n, bias, weight_t)
    return x, wg, wu, bg, bu


def _linear_glu_samples() -> Dict[str, Args]:
    def sample(device, case):
        shape, k, n, bias, act, weight_t = case
        return (*_glu_inputs(device, shape, k, n, bias, weight_t), act, weight_t), {}
    return {str(case): lambda d, case=case: sample(d, case) for case in _GLU_CASES}


LINEAR_GLU = OpDef(
    name="linear_glu", reference=reference.linear_glu, fake=_linear_glu_fake, samples=_linear_glu_samples(),
    autocast=True,
    bad_inputs={
        "int-x": (lambda: (_x().long(), _w(), _w()), TypeError),
        "dtype-weight_up": (lambda: (_x(), _w(), _w().double()), TypeError),
        "dtype-bias_gate": (lambda: (_x(), _w(), _w(), torch.randn(5).half()), TypeError),
        "int-bias_up": (lambda: (_x(), _w(), _w(), None, torch.ones(5, dtype=torch.long)), TypeError),
        "sparse-weight_gate": (lambda: (_x(), _w().to_sparse(), _w()), NotImplementedError),
        "numpy-weight_up": (lambda: (_x(), _w(), _numpy((4, 5))), RuntimeError),
        "act-None": (lambda: (_x(), _w(), _w(), None, None, None), RuntimeError),
        "act-unknown": (lambda: (_x(), _w(), _w(), None, None, "swish"), ValueError),
        "weight_gate-1d": (lambda: (_x(), torch.randn(4), _w()), RuntimeError),
        "x-0d": (lambda: (torch.tensor(1.0), _w(), _w()), RuntimeError),
        "in-features": (lambda: (_x(), torch.randn(5, 4), torch.randn(5, 4)), RuntimeError),
        "weights-differ": (lambda: (_x(), _w(), torch.randn(4, 6)), RuntimeError),
        "bias_up-shape": (lambda: (_x(), _w(), _w(), None, torch.randn(4)), RuntimeError),
        "weight_t-in-features": (lambda: (_x(), _w(), _w(), None, None, "silu", True), RuntimeError),
        "meta-weight_up": (lambda: (_x(), _w(), _w().to("meta")), RuntimeError),
    })


def _linear_glu_forward_fake(x, weight_gate, weight_up, bias_gate=None, bias_up=None, act="silu", weight_t=False):
    out = _linear_glu_fake(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t)
    return out, torch.empty_like(out), torch.empty_like(out)


def _detached(sample: Args) -> Args:
    """The sample's tensors without autograd: linear_glu's autograd calls the op below autograd (it has none
    of its own, as the backward ops)."""
    def args(device):
        values, kwargs = sample(device)
        return tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in values), kwargs
    return args


LINEAR_GLU_FORWARD = OpDef(
    name="linear_glu_forward", reference=reference.linear_glu_forward, fake=_linear_glu_forward_fake,
    samples={case: _detached(sample) for case, sample in LINEAR_GLU.samples.items()}, bad_inputs=LINEAR_GLU.bad_inputs)


def _linear_glu_backward_fake(grad, x, weight_gate, weight_up, gate, up, act, output_mask):
    reference.check_linear_glu_backward(grad, x, weight_gate, weight_up, gate, up, act)
    n = weight_gate.shape[1]
    return (x.new_empty(x.shape) if output_mask[0] else None,
            reference.linear_grad_weight_like(weight_gate) if output_mask[1] else None,
            reference.linear_grad_weight_like(weight_up) if output_mask[2] else None,
            x.new_empty((n,)) if output_mask[3] else None,
            x.new_empty((n,)) if output_mask[4] else None)


def _linear_glu_backward_samples() -> Dict[str, Args]:
    def sample(device, case, mask):
        shape, k, n, bias, act, weight_t = case
        x, wg, wu, bg, bu = (t.detach() if t is not None else None
                             for t in _glu_inputs(device, shape, k, n, bias, weight_t))
        wg, wu = (wg.t(), wu.t()) if weight_t else (wg, wu)  # the backward takes (in, hidden)
        gate, up = reference.linear_act(x, wg, bg, "none"), reference.linear_act(x, wu, bu, "none")
        grad = torch.randn((*shape[:-1], n), dtype=x.dtype, device=device)
        return (grad, x, wg, wu, gate, up, act, mask), {}
    masks = ([True] * 5, [False, True, False, True, False], [True, False, True, False, True], [False] * 5)
    return {f"{case}-{mask}": lambda d, case=case, mask=mask: sample(d, case, mask)
            for case in _GLU_CASES for mask in masks}


_GLU_MASK = [True] * 5
LINEAR_GLU_BACKWARD = OpDef(
    name="linear_glu_backward", reference=reference.linear_glu_backward, fake=_linear_glu_backward_fake,
    samples=_linear_glu_backward_samples(),
    bad_inputs={
        "grad-shape": (lambda: (torch.randn(3, 4), _x(), _w(), _w(), _g(), _g(), "silu", _GLU_MASK), RuntimeError),
        "gate-shape": (lambda: (_g(), _x(), _w(), _w(), torch.randn(3, 4), _g(), "silu", _GLU_MASK),
                       RuntimeError),
        "up-dtype": (lambda: (_g(), _x(), _w(), _w(), _g(), _g().half(), "silu", _GLU_MASK), TypeError),
        "grad-dtype": (lambda: (_g().double(), _x(), _w(), _w(), _g(), _g(), "silu", _GLU_MASK), TypeError),
        "act-unknown": (lambda: (_g(), _x(), _w(), _w(), _g(), _g(), "swish", _GLU_MASK), ValueError),
        "weights-differ": (lambda: (_g(), _x(), _w(), torch.randn(4, 6), _g(), _g(), "silu", _GLU_MASK),
                           RuntimeError),
        "meta-gate": (lambda: (_g(), _x(), _w(), _w(), _g().to("meta"), _g(), "silu", _GLU_MASK), RuntimeError),
        "sparse-grad": (lambda: (_g().to_sparse(), _x(), _w(), _w(), _g(), _g(), "silu", _GLU_MASK),
                        NotImplementedError),
    })


OPDEFS: Dict[str, OpDef] = {d.name: d for d in (CENTERED, MASKED_UNIFORM, LINEAR_ACT, LINEAR_ACT_BACKWARD,
                                                LINEAR_GLU, LINEAR_GLU_FORWARD, LINEAR_GLU_BACKWARD)}

if set(OPDEFS) != set(_SCHEMAS):
    raise ImportError(f"customlayers: the ops of {SCHEMA_FILE.name} ({sorted(_SCHEMAS)}) and of "
                      f"customlayers._opdefs ({sorted(OPDEFS)}) differ")
