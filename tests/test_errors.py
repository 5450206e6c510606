"""Every bad input of every op raises the same exception type whichever implementation serves it: the
compiled kernels, the pure-PyTorch fallback registered in their place (the cpu_fallback fixture, as
CUSTOMLAYERS_FORCE_FALLBACK=cpu), the fallback without the compiled library (CUSTOMLAYERS_FORCE_FALLBACK=1,
in a subprocess), the fake implementations (meta tensors) and customlayers.reference called directly.
The messages may differ; the types are the table's. Also: a fork after use works as for PyTorch's ops."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import customlayers
from customlayers import functional as F
from customlayers import init
from customlayers._opdefs import OPDEFS, _g, _inference, _w, _x
from conftest import requires_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = torch.ops.customlayers
MASK = [True, True, True]
# id: (op, arguments, exception type), from every op's entry (customlayers._opdefs). The arguments are built
# when a case runs.
OP_CASES = {f"{name}-{case}": (name, args, exc) for name, d in OPDEFS.items() for case, (args, exc) in d.bad_inputs.items()}


# The Python API on top of the ops: id: (call, exception type).
API_CASES = {
    "F.centered-dim-float": (lambda: F.centered(_x(), 1.5), TypeError),
    "F.centered-0dim-repeated": (lambda: F.centered(torch.tensor(1.0), [0, 0]), RuntimeError),
    "F.centered-sparse": (lambda: F.centered(_x().to_sparse()), NotImplementedError),
    "F.linear_act-act-None": (lambda: F.linear_act(_x(), _w(), None, None), RuntimeError),
    "F.linear_act-numpy-weight": (lambda: F.linear_act(_x(), _w().numpy()), RuntimeError),
    "F.linear_act-sparse-x": (lambda: F.linear_act(_x().to_sparse(), _w()), NotImplementedError),
    "init.masked_uniform_-inference-tensor": (lambda: init.masked_uniform_(_inference(), seed=0), RuntimeError),
    "init.masked_uniform_-sparse": (lambda: init.masked_uniform_(torch.zeros(3, 3).to_sparse(), seed=0),
                                    NotImplementedError),
    "grad-centered-0dim-repeated": (lambda: torch.func.grad(lambda t: F.centered(t, [0, 0]).sum())(torch.tensor(1.0)),
                                    RuntimeError),
    "grad-linear_act-act-None": (lambda: torch.func.grad(lambda t: F.linear_act(t, _w(), None, None).sum())(_x()),
                                 RuntimeError),
    "grad-linear_act-weight_t-in-features": (lambda: torch.func.grad(
        lambda t: F.linear_act(t, _w(), None, "relu", weight_t=True).sum())(_x()), RuntimeError),
}


def _call_op(case):
    op, args, _ = OP_CASES[case]
    getattr(C, op)(*args())


def _raises(fn, case, exc):
    with pytest.raises(exc):
        fn(case)


@requires_extension()
@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_kernel(case):
    _raises(_call_op, case, OP_CASES[case][2])


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_fallback(case, cpu_fallback):
    _raises(_call_op, case, OP_CASES[case][2])


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_reference_directly(case):
    op, args, exc = OP_CASES[case]
    with pytest.raises(exc):
        OPDEFS[op].reference(*args())


@requires_extension()
@pytest.mark.parametrize("case", API_CASES)
def test_api_kernel(case):
    _raises(lambda c: API_CASES[c][0](), case, API_CASES[case][1])


@pytest.mark.parametrize("case", API_CASES)
def test_api_fallback(case, cpu_fallback):
    _raises(lambda c: API_CASES[c][0](), case, API_CASES[case][1])


_SUBPROCESS = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, "tests")
import test_errors as t
out = {}
for case in t.OP_CASES:
    try:
        t._call_op(case)
        out[case] = None
    except Exception as exc:
        out[case] = type(exc).__name__
for case, (call, _) in t.API_CASES.items():
    try:
        call()
        out[case] = None
    except Exception as exc:
        out[case] = type(exc).__name__
print(json.dumps(out))
"""


def test_without_compiled_library():
    """CUSTOMLAYERS_FORCE_FALLBACK=1: the references are the ops' only kernels, for every backend."""
    env = dict(os.environ, PYTHONPATH=ROOT, CUSTOMLAYERS_FORCE_FALLBACK="1")
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {case: exc.__name__ for case, (_, _, exc) in OP_CASES.items()}
    expected.update({case: exc.__name__ for case, (_, exc) in API_CASES.items()})
    assert got == expected


@requires_extension()
def test_fakes_refuse_at_trace_time():
    """torch.compile traces the ops with their fakes: a bad call fails while tracing, before any kernel runs."""
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return gm

    @torch.compile(backend=backend, fullgraph=True)
    def backward(grad, x, w, out):
        return C.linear_act_backward(grad, x, w, out, "relu", [True, True, True])

    x, w = _x(), _w()
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="expected grad of shape"):
        backward(torch.randn(3, 4), x, w, _g())
    with pytest.raises(Exception, match="same dtype"):
        backward(_g().double(), x, w, _g())
    assert not compiled
    dx, dw, db = backward(_g(), x, w, _g())
    assert len(compiled) == 1 and dx.shape == x.shape and dw.shape == w.shape and db.shape == (5,)


@requires_extension()
def test_masked_uniform_fake_refuses_what_the_kernel_refuses():
    """On meta tensors masked_uniform_ runs its fake: an expanded tensor and an inference tensor outside
    inference mode are refused as the kernel refuses them."""
    for device in ("cpu", "meta"):
        with pytest.raises(RuntimeError, match="share|single memory location"):
            C.masked_uniform_(torch.empty(1, device=device).expand(4), -1.0, 1.0, 0.5, 0)
        with torch.inference_mode():
            inference = torch.empty(4, device=device)
        with pytest.raises(RuntimeError, match="inference tensor"):
            C.masked_uniform_(inference, -1.0, 1.0, 0.5, 0)


@requires_extension()
def test_fakes_give_outputs_on_the_inputs_device():
    """On meta tensors the ops run their fakes: outputs on meta, never uninitialized CPU tensors."""
    meta = lambda t: t.to("meta")  # noqa: E731
    dx, dw, db = C.linear_act_backward(meta(_g()), meta(_x()), meta(_w()), meta(_g()), "relu", MASK)
    assert all(t.device.type == "meta" for t in (dx, dw, db))
    assert C.linear_act(meta(_x()), meta(_w()), None).device.type == "meta"
    assert C.centered(meta(_x()), [0]).device.type == "meta"


def test_fork_after_use():
    """A child forked after the ops ran multi-threaded gets the same results once it sets one thread (as
    for PyTorch's own ops, whose OpenMP pool does not survive fork)."""
    x, w = torch.randn(256, 4096), torch.randn(4096, 64)

    def run():
        return F.centered(x, 0), F.linear_act(x, w), init.masked_uniform_(torch.empty(4096), seed=1)

    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        expected = run()
    finally:
        torch.set_num_threads(before)
    pid = os.fork()
    if pid == 0:  # the child: exits with 0 when every result matches, is killed after 60 s
        signal.alarm(60)
        torch.set_num_threads(1)
        os._exit(0 if all(torch.equal(a, b) for a, b in zip(expected, run())) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("path", ["kernel", "fallback"])
def test_inference_mode_fills(path, request):
    """Inside torch.inference_mode() masked_uniform_ fills inference and normal tensors alike (the refusal
    above is only for an inference tensor outside it)."""
    if path == "fallback":
        request.getfixturevalue("cpu_fallback")
    elif not customlayers._ops.loaded():
        pytest.skip(f"compiled extension not in use: {customlayers._ops.reason()}")
    normal = torch.zeros(64)
    with torch.inference_mode():
        inference = torch.zeros(64)
        for t in (inference, normal):
            init.masked_uniform_(t, seed=0)
    assert inference.abs().max() > 0 and normal.abs().max() > 0
