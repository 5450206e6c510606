"""Peak memory: each op, at a size where its buffers dwarf the allocator's noise, needs no more memory
beyond its inputs than the pure-PyTorch reference (customlayers.reference) computing the same thing.
Peak resident memory is read from /proc (VmHWM, reset through /proc/self/clear_refs before each call)."""
import gc
import re

import pytest
import torch

from customlayers import reference
from conftest import requires_extension

C = torch.ops.customlayers
MiB = 1 << 20
SLACK = 8 * MiB          # thread stacks, per-task scratch, allocator rounding
REL = 1.03               # and 3% of the reference's extra memory


def _status(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _can_reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


pytestmark = [requires_extension(),
              pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux's /proc/self/clear_refs to reset the "
                                 "peak resident memory (VmHWM)")]


def peak_extra(fn, *args):
    """Bytes of resident memory the call of fn(*args) added at its peak, its result included."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    result = fn(*args)
    peak = _status("VmHWM")
    del result
    return peak - before


def assert_within_reference(ours, ref, *args):
    ref_extra = peak_extra(ref, *args)
    our_extra = peak_extra(ours, *args)
    assert our_extra <= ref_extra * REL + SLACK, \
        f"{our_extra / MiB:.0f} MiB beyond the inputs, against {ref_extra / MiB:.0f} MiB for the reference"


CENTERED_CASES = [((2, 1 << 24), [0]), ((1 << 24,), None), ((64, 1 << 18), [1]), ((1 << 12, 1 << 12), [0]),
                  ((1 << 14, 64, 16), [0])]


@pytest.mark.parametrize("shape, dim", CENTERED_CASES, ids=str)
def test_centered(shape, dim):
    x = torch.rand(shape)
    assert_within_reference(C.centered, reference.centered, x, dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape, dim", CENTERED_CASES, ids=str)
def test_centered_cuda(shape, dim):
    """The same on the GPU, from the caching allocator's peak."""
    x = torch.rand(shape, device="cuda")

    def extra(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = fn(x, dim)
        torch.cuda.synchronize()
        del y
        return torch.cuda.max_memory_allocated() - base

    ref, ours = extra(reference.centered), extra(C.centered)
    assert ours <= ref * REL + SLACK, f"{ours / MiB:.0f} MiB against {ref / MiB:.0f} MiB for the reference"


def test_linear_act_forward_and_backward():
    x, w, b = torch.rand(1 << 19, 32) - 0.5, torch.rand(32, 32) - 0.5, torch.rand(32) - 0.5
    assert_within_reference(C.linear_act, reference.linear_act, x, w, b, "relu")
    out = C.linear_act(x, w, b, "relu")
    grad = torch.randn_like(out)
    args = (grad, x, w, out, "relu", [True, True, True])
    assert_within_reference(C.linear_act_backward, reference.linear_act_backward, *args)


def test_masked_uniform_():
    w = torch.zeros(1 << 25)
    assert_within_reference(lambda t: C.masked_uniform_(t, -10, 10, 5, 0),
                            lambda t: reference.masked_uniform_op(t, -10, 10, 5, 0), w)


def test_linear_glu_forward_and_backward():
    x = torch.rand(1 << 16, 64) - 0.5
    wg, wu = torch.rand(64, 256) - 0.5, torch.rand(64, 256) - 0.5
    assert_within_reference(C.linear_glu, reference.linear_glu, x, wg, wu, None, None, "silu")
    gate, up = x @ wg, x @ wu
    args = (torch.randn_like(gate), x, wg, wu, gate, up, "silu", [True] * 5)
    assert_within_reference(C.linear_glu_backward, reference.linear_glu_backward, *args)


_STEP_PEAK = """
import sys, torch, customlayers
sys.path.insert(0, {tests!r})
import test_memory
from benchmarks.bench_mlp import LlamaMLP
torch.manual_seed(0)
model = LlamaMLP(512, 1376)
if {converted!r}:
    model = customlayers.convert(model)
x = torch.randn(4096, 512)
def step(model):
    model(x).square().sum().backward()
step(model)  # the gradients allocated, as in every later step
print(test_memory.peak_extra(step, model))
"""


def test_gated_mlp_training_step_within_native():
    """The converted LLaMA-style MLP's training step (forward, backward) peaks at most at native's: it saves
    gate and up where native saves gate, act(gate) and up. Each in a fresh process, after one step (what
    the allocator keeps from earlier work would otherwise decide), with glibc's mmap threshold fixed at 64 KiB
    (MALLOC_MMAP_THRESHOLD_): every large buffer is its own mapping, returned to the system when freed, so
    that the resident memory follows what is alive (glibc's threshold otherwise rises after the first frees,
    and later buffers reuse the heap unseen)."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))

    def peak(converted):
        out = subprocess.run([sys.executable, "-c", _STEP_PEAK.format(tests=tests, converted=converted)],
                             capture_output=True, text=True, timeout=300, cwd=os.path.dirname(tests),
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
                                  "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert out.returncode == 0, out.stderr[-3000:]
        return int(out.stdout.split()[-1])
    ours, theirs = peak(True), peak(False)
    assert ours <= theirs * REL + SLACK, f"{ours / MiB:.0f} MiB against {theirs / MiB:.0f} MiB natively"
