"""The book's GPU helpers (section "GPUs"): a device to use, falling back to the CPU.

    net = net.to(customlayers.try_gpu())
"""
from __future__ import annotations

from typing import List

import torch

__all__ = ["try_all_gpus", "try_gpu"]


def try_gpu(i: int = 0) -> torch.device:
    """``torch.device(f'cuda:{i}')`` if GPU ``i`` exists, else ``torch.device('cpu')`` (the book's try_gpu)."""
    if torch.cuda.device_count() >= i + 1:
        return torch.device(f"cuda:{i}")
    return torch.device("cpu")


def try_all_gpus() -> List[torch.device]:
    """Every GPU, ``[cuda:0, cuda:1, ...]``, or ``[torch.device('cpu')]`` when there is none (the book's
    try_all_gpus)."""
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return devices if devices else [torch.device("cpu")]
