"""benchmarks/bench_mlp.py's training step: the converted and native MLPs start from the same weights and
take the same SGD steps (torch.compile's step is exercised by the benchmark itself)."""
import copy

import torch

import customlayers
from benchmarks import bench_mlp


def test_train_steps_match():
    for _, widths in bench_mlp.MODELS:
        native = bench_mlp.mlp(widths)
        x, y = torch.randn(bench_mlp.BATCH, widths[0]), torch.randint(0, widths[-1], (bench_mlp.BATCH,))
        ours = bench_mlp.train_step(customlayers.convert(native), x, y)
        theirs = bench_mlp.train_step(copy.deepcopy(native), x, y)
        for _ in range(3):  # the same loss at every step: same weights before each
            torch.testing.assert_close(ours(), theirs(), rtol=1e-5, atol=1e-5)


def test_transformer_block_train_steps_match():
    for _, activation in bench_mlp.BLOCKS:
        native = bench_mlp.block(activation)
        x, y = torch.randn(16, bench_mlp.BLOCK_WIDTHS[0]), torch.randn(16, bench_mlp.BLOCK_WIDTHS[-1])
        mse = torch.nn.MSELoss()
        ours = bench_mlp.train_step(customlayers.convert(native), x, y, mse)
        theirs = bench_mlp.train_step(copy.deepcopy(native), x, y, mse)
        for _ in range(3):
            torch.testing.assert_close(ours(), theirs(), rtol=1e-5, atol=1e-5)


def test_llama_block_train_steps_match():
    _, d, hidden = bench_mlp.LLAMA
    native = bench_mlp.LlamaMLP(d, hidden // 8)
    converted, names = customlayers.convert(native, report=True)
    assert sorted(names) == ["down_proj", "gate_proj", "up_proj"]
    x, y = torch.randn(16, d), torch.randn(16, d)
    mse = torch.nn.MSELoss()
    ours = bench_mlp.train_step(converted, x, y, mse)
    theirs = bench_mlp.train_step(copy.deepcopy(native), x, y, mse)
    for _ in range(3):
        torch.testing.assert_close(ours(), theirs(), rtol=1e-5, atol=1e-5)
