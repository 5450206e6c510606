"""Drop-in nn.Module versions of the custom layers."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import functional as F

__all__ = ["CenteredLayer"]


class CenteredLayer(nn.Module):
    """The book's ``CenteredLayer``: ``X - X.mean()``; with ``dim``, ``X - X.mean(dim, keepdim=True)``.

    >>> CenteredLayer()(torch.tensor([1.0, 2, 3, 4, 5]))
    tensor([-2., -1.,  0.,  1.,  2.])
    """

    def __init__(self, dim: Optional[Union[int, Sequence[int]]] = None):
        super().__init__()
        self.dim = dim if dim is None or isinstance(dim, int) else tuple(dim)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return F.centered(X, self.dim)

    def extra_repr(self) -> str:
        return "" if self.dim is None else f"dim={self.dim}"
