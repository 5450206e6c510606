"""Benchmark of customlayers.init.masked_uniform_ (the book's initializer in one pass) against the book's
code (``uniform_`` then ``w *= w.abs() >= 5``) and against ``Tensor.uniform_`` alone.
Run: python -m benchmarks.bench_masked_uniform [run.py options]."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from customlayers.init import masked_uniform_

from .harness import FWD, OURS, Case, Device

OP = "masked_uniform_"
SIZES = [1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26]   # 1K .. 64M
QUICK_SIZES = [1 << 10, 1 << 16, 1 << 20, 1 << 24]                        # 1K, 64K, 1M, 16M


def book(w: torch.Tensor) -> None:
    """The book's my_init body."""
    w.uniform_(-10, 10)
    w *= w.abs() >= 5


def uniform_only(w: torch.Tensor) -> None:
    w.uniform_(-10, 10)


def ours(w: torch.Tensor) -> None:
    masked_uniform_(w)


def _filler(fn: Callable[[torch.Tensor], None], w: torch.Tensor) -> Callable[[], None]:
    # Returns None: random fills cannot be compared value for value (tests/test_masked_uniform.py checks them).
    return lambda: fn(w) and None


def cases(device: Device, quick: bool = False) -> List[Case]:
    """fwd cases on 1-D float32 tensors, every implementation filling the same tensor in place."""
    out = []
    for n in QUICK_SIZES if quick else SIZES:
        w = torch.empty(n, device=device)
        impls = {OURS: _filler(ours, w), "book (uniform_ + mask)": _filler(book, w),
                 "uniform_ alone": _filler(uniform_only, w)}
        out.append(Case(OP, n, w.dtype, FWD, impls, bytes_moved=n * w.element_size()))  # one write pass
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .run import main as run_main
    run_main(argv, default_ops=[OP])


if __name__ == "__main__":
    main()
