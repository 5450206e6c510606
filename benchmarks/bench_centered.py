"""Benchmark of customlayers.functional.centered (global mean, the book's CenteredLayer) against eager
PyTorch and torch.compile. Run: python -m benchmarks.bench_centered [run.py options]."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from customlayers.functional import centered

from .harness import FWD, FWD_BWD, OURS, Case, Ceiling, Device, bind, compile_fresh

OP = "centered"
SIZES = [1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26]   # 1K .. 64M
QUICK_SIZES = [1 << 10, 1 << 16, 1 << 20, 1 << 24]                        # 1K, 64K, 1M, 16M
BF16_SIZES = [1 << 20, 1 << 24]                                           # 1M, 16M (full run only)


def eager(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean()


def reference(x: torch.Tensor, g: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
    """The float64 truth of the case's output: x - x.mean() (g = None), or its gradient w.r.t. x for the
    output gradient g, g - g.mean()."""
    def truth() -> torch.Tensor:
        v = (x if g is None else g).detach().double()
        return v - v.mean()
    return truth


def cases(device: Device, quick: bool = False) -> List[Case]:
    """fwd and fwd+bwd cases on 1-D tensors; every implementation of a case shares its inputs."""
    torch.manual_seed(0)
    shapes = [(n, torch.float32) for n in (QUICK_SIZES if quick else SIZES)]
    shapes += [] if quick else [(n, torch.bfloat16) for n in BF16_SIZES]
    out = []
    for n, dtype in shapes:
        x = torch.randn(n, device=device, dtype=dtype)
        grad_inputs = (x.detach().requires_grad_(),)  # same storage as x
        g = torch.randn_like(x)
        # fwd reads x twice (mean, subtraction) and writes once; fwd+bwd does the same again for g.
        # The forward's ceiling: a copy of x into an existing tensor (one read, one write).
        copy_into = torch.empty_like(x)
        copy = Ceiling("copy_", lambda x=x, y=copy_into: y.copy_(x), 2 * n * x.element_size())
        for mode, inputs, passes in ((FWD, (x,), 3), (FWD_BWD, grad_inputs, 6)):
            fns = {OURS: centered, "eager": eager, "torch.compile": compile_fresh(eager, dynamic=False)}
            out.append(Case(OP, n, dtype, mode, bind(fns, inputs, mode, (g,)),
                            bytes_moved=passes * n * x.element_size(),
                            reference=reference(x, g if mode == FWD_BWD else None),
                            ceiling=copy if mode == FWD else None))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .run import main as run_main
    run_main(argv, default_ops=[OP])


if __name__ == "__main__":
    main()
