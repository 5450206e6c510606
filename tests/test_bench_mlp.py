"""benchmarks/bench_mlp.py's training steps: the converted and native MLPs start from the same weights and
take the same SGD steps (torch.compile's step is exercised by the benchmark itself)."""
import torch

from benchmarks import bench_mlp
from benchmarks.harness import OURS


def test_train_steps_match():
    for case in bench_mlp.cases("cpu"):
        ours, native = case.impls[OURS], case.impls["native"]
        for _ in range(3):  # the same loss at every step: same weights before each
            torch.testing.assert_close(ours(), native(), rtol=1e-5, atol=1e-5)
