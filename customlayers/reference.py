"""Pure-PyTorch implementations of every op: the fallback when a compiled kernel is missing, and the
ground truth the tests compare the kernels with."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["centered", "linear_act", "masked_uniform_"]


def centered(x: torch.Tensor, dim: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``x - x.mean()`` (the book's CenteredLayer), or ``x - x.mean(dim, keepdim=True)``."""
    if dim is None or len(dim) == 0:
        return x - x.mean()
    return x - x.mean(dim=tuple(dim), keepdim=True)


def masked_uniform_(w: torch.Tensor, a: float = -10.0, b: float = 10.0, threshold: float = 5.0,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The book's initializer, in place: ``uniform_(w, a, b)`` then ``w *= w.abs() >= threshold``."""
    w.uniform_(a, b, generator=generator)
    w *= w.abs() >= threshold
    return w


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               act: str = "relu") -> torch.Tensor:
    """``torch.relu(x @ weight + bias)`` (the book's MyLinear), weight (in_features, out_features);
    act='none' leaves out the ReLU."""
    y = x @ weight
    if bias is not None:
        y = y + bias
    return torch.relu(y) if act == "relu" else y
