"""Parameter initializers of the custom layers."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["linear_"]


@torch.no_grad()
def linear_(weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, transposed: bool = False) -> None:
    """nn.Linear's default initialization, in place: weight ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform
    with a=sqrt(5)), and bias ~ U(-1/sqrt(in), 1/sqrt(in)).

    ``weight`` is (out_features, in_features) like nn.Linear's, or with ``transposed=True`` (in_features,
    out_features) like the book's MyLinear. Both draw the same random numbers in the same order, so under
    the same seed a transposed weight equals ``nn.Linear(in, out).weight.t()``.
    """
    if transposed:
        drawn = torch.empty(weight.shape[::-1], dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))
        weight.copy_(drawn.t())
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[0] if transposed else weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
