"""Tensors of more than 2^31 elements (64-bit indexing): centered, masked_uniform_ and linear_act on
float16 tensors of 4+ GiB, checked exactly on sampled positions. Slow (run by `make test-long`) and
skipped where the machine lacks the memory."""
import pytest
import torch

from conftest import requires_extension

N31 = 1 << 31
GiB = 1 << 30
pytestmark = [pytest.mark.slow, requires_extension()]
C = torch.ops.customlayers


def _available_bytes():
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def need(gib):
    if _available_bytes() < gib * GiB:
        pytest.skip(f"needs {gib} GiB of available memory, {_available_bytes() / GiB:.1f} GiB available")


def samples(n, boundary=N31, count=4096):
    """Positions in [0, n): the ends, around `boundary` (where offsets pass 2^31) and random ones, half of
    them beyond it."""
    edges = torch.tensor([0, 1, boundary - 1, boundary, boundary + 1, n - 2, n - 1])
    return torch.cat([edges, torch.randint(0, n, (count,)), torch.randint(boundary, n, (count,))])


def test_centered_beyond_int32():
    """x[i] = (i % 7) / 2 over 7 * m > 2^31 elements (m prime to 7): every mean below is 1.5 exactly."""
    need(10)
    m = N31 // 7 + 5
    x = torch.empty(7 * m, dtype=torch.float16)
    x.view(m, 7).copy_((torch.arange(7, dtype=torch.float16) / 2).expand(m, 7))
    pos = samples(x.numel())
    expected = (pos % 7).to(torch.float16) / 2 - 1.5
    for view, dim in ((x, None), (x.view(m, 7), [1]), (x.view(7, m), [0])):
        y = C.centered(view, dim).view(-1)
        assert torch.equal(y[pos], expected), dim
        del y


def test_masked_uniform_beyond_int32():
    """Philox counter (i / 4, 0) under the seed gives element i: draws at sampled positions, computed by
    tests/test_masked_uniform.py's Python model, are the kernel's exactly (a=0, b=1, threshold=0: the raw
    24-bit uniform, rounded to float16)."""
    from test_masked_uniform import M32, philox4x32_10
    need(6)
    n, seed = N31 + 4099, 20261201
    w = torch.empty(n, dtype=torch.float16)
    C.masked_uniform_(w, 0.0, 1.0, 0.0, seed, 0)
    pos = samples(n, count=256)
    words = [philox4x32_10([(i // 4) & M32, (i // 4) >> 32, 0, 0], [seed, 0])[i % 4] for i in pos.tolist()]
    expected = torch.tensor([(v >> 8) * 2.0 ** -24 for v in words], dtype=torch.float32).to(torch.float16)
    assert torch.equal(w[pos], expected)


def test_linear_act_beyond_int32():
    """x of (2^27 + 3, 16) (2^31 + 48 elements) with rows cycling through 5 integer patterns: every output
    row is relu(pattern @ w + b), exact in float16."""
    need(8)
    rows, k = (1 << 27) + 3, 16
    patterns = torch.randint(-2, 3, (5, k)).to(torch.float16)
    x = torch.empty(rows, k, dtype=torch.float16)
    whole = rows // 5 * 5
    x[:whole].view(-1, 5, k).copy_(patterns.expand(whole // 5, 5, k))
    x[whole:].copy_(patterns[: rows - whole])
    w, b = torch.randint(-2, 3, (k, 4)).to(torch.float16), torch.randint(-3, 4, (4,)).to(torch.float16)
    y = C.linear_act(x, w, b, "relu")
    expected_rows = torch.relu(patterns.double() @ w.double() + b.double()).to(torch.float16)
    pos = samples(rows, boundary=N31 // k)
    assert torch.equal(y[pos], expected_rows[pos % 5])
    assert torch.equal(C.linear_act(x[-5:], w, b, "relu"), y[-5:])
