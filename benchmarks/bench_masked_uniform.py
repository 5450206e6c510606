"""Benchmark of customlayers.init.masked_uniform_ (the book's initializer in one pass) against the book's
code (``uniform_`` then ``w *= w.abs() >= 5``) and against ``Tensor.uniform_`` alone.
Run: python -m benchmarks.bench_masked_uniform [run.py options]."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from customlayers.init import masked_uniform_

from .harness import FWD, OURS, Case, Ceiling, Device

LOW, HIGH, THRESHOLD = -10.0, 10.0, 5.0  # the book's (masked_uniform_'s defaults)
SIGMAS = 6.0  # how far a random statistic may stray from its expectation before a fill is called wrong

OP = "masked_uniform_"
SIZES = [1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26]   # 1K .. 64M
QUICK_SIZES = [1 << 10, 1 << 16, 1 << 20, 1 << 24]                        # 1K, 64K, 1M, 16M


def book(w: torch.Tensor) -> None:
    """The book's my_init body."""
    w.uniform_(LOW, HIGH)
    w *= w.abs() >= THRESHOLD


def uniform_only(w: torch.Tensor) -> None:
    w.uniform_(LOW, HIGH)


def ours(w: torch.Tensor) -> None:
    masked_uniform_(w, LOW, HIGH, THRESHOLD)


def _filler(fn: Callable[[torch.Tensor], None], w: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Fill w in place and return it, for the property check (the harness checks the warm-up's fill
    before the next implementation refills the tensor)."""
    def fill() -> torch.Tensor:
        fn(w)
        return w
    return fill


def _kept(low: float, high: float, threshold: float) -> List[Tuple[float, float]]:
    """The intervals of [low, high) that the mask keeps (|v| >= threshold)."""
    parts = [(low, min(high, -threshold)), (max(low, threshold), high)]
    return [(a, b) for a, b in parts if b > a]


def check_fill(w: torch.Tensor, low: float = LOW, high: float = HIGH, threshold: float = THRESHOLD) -> Optional[str]:
    """Why `w` is not a plausible masked uniform fill (None when it is). Random fills have no value
    reference (no two generators draw the same numbers), so every implementation is checked for the
    properties of uniform_(low, high) followed by w *= |w| >= threshold instead: every value finite and in
    [low, high] (drawn in [low, high), a value may round to high in the dtype, as masked_uniform_
    documents); every value 0 or of magnitude >= threshold (zero exactly where the draw was below it);
    and, within SIGMAS standard deviations (binomial, or of a mean of uniforms), the fraction of
    nonzeros, the fraction of positives among them and their mean magnitude as the distribution predicts."""
    v = w.detach().double().flatten()
    n = v.numel()
    if not n:
        return None
    if not torch.isfinite(v).all():
        return "non-finite values"
    if (v < low).any() or (v > high).any():
        return f"values outside [{low:g}, {high:g}]: min {v.min().item():.4g}, max {v.max().item():.4g}"
    small = (v != 0) & (v.abs() < threshold)
    if small.any():
        return f"{int(small.sum())} nonzero values of magnitude below the threshold {threshold:g}"
    parts = _kept(low, high, threshold)
    kept_len = sum(b - a for a, b in parts)
    nz = v[v != 0]

    def off(what: str, got: float, expected: float, sd: float) -> Optional[str]:
        if abs(got - expected) > SIGMAS * sd + 1e-12:
            return f"{what} {got:.4g}, expected {expected:.4g} +- {SIGMAS * sd:.2g}"
        return None

    p = kept_len / (high - low)
    why = off("fraction of nonzeros", nz.numel() / n, p, math.sqrt(p * (1 - p) / n) + 1 / n)
    if why or nz.numel() < 2:
        return why
    m = nz.numel()
    q = sum(b - max(a, 0.0) for a, b in parts if b > 0) / kept_len  # share of the kept length above 0
    why = off("fraction of positive nonzeros", (nz > 0).sum().item() / m, q, math.sqrt(q * (1 - q) / m) + 1 / m)
    if why:
        return why
    # the kept intervals lie each on one side of 0 (threshold >= 0), so |v|'s mean is that of |midpoints|
    mean = sum((b - a) * abs(a + b) / 2 for a, b in parts) / kept_len
    second = sum((b - a) * (a * a + a * b + b * b) / 3 for a, b in parts) / kept_len
    return off("mean magnitude of the nonzeros", nz.abs().mean().item(), mean,
               math.sqrt(max(second - mean * mean, 0.0) / m))


def cases(device: Device, quick: bool = False) -> List[Case]:
    """fwd cases on 1-D float32 tensors, every implementation filling the same tensor in place; the fills
    are checked with check_fill ("uniform_ alone" draws without the mask: not checked)."""
    out = []
    for n in QUICK_SIZES if quick else SIZES:
        w = torch.empty(n, device=device)
        impls = {OURS: _filler(ours, w), "book (uniform_ + mask)": _filler(book, w),
                 "uniform_ alone": _filler(uniform_only, w)}
        out.append(Case(OP, n, w.dtype, FWD, impls, bytes_moved=n * w.element_size(),  # one write pass
                        check=check_fill, unchecked=("uniform_ alone",),
                        ceiling=Ceiling("fill_", lambda w=w: w.fill_(1.0), n * w.element_size())))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .run import main as run_main
    run_main(argv, default_ops=[OP])


if __name__ == "__main__":
    main()
