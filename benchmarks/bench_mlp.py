"""End-to-end benchmark: one training step (zero_grad, forward, cross-entropy loss, backward, SGD step) of
whole MLPs: the book's (20 -> 256 -> ReLU -> 10, batch 256) and an MNIST-sized one (784 -> 256 -> ReLU ->
256 -> ReLU -> 10, batch 256), transformer MLP blocks (GELU, SiLU) and a LLaMA-style gated MLP (float32 and
bfloat16), as ``customlayers.convert()`` makes them (Linear + ReLU fused into LinearReLU, the gated unit
into linear_glu), native PyTorch and ``torch.compile`` of the native model, in one run. Every implementation
starts from the same weights and trains on the same batch; each one's first-step loss is checked against
the loss of a float64 copy of the model on the same batch.
Run: python -m benchmarks.bench_mlp [run.py options]."""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

import customlayers

from .harness import OURS, Case, Device

OP = "mlp_train_step"
# LinearReLU's, LinearGELU's, LinearSiLU's and the gated units' ops (linear_glu_forward: its training forward)
OPS_USED = ["linear_act", "linear_glu", "linear_glu_forward"]
MODE = "train step"
BATCH = 256
# (label, layer widths): Linear + ReLU between consecutive widths, a plain Linear last.
MODELS = [("book 20->256->10", (20, 256, 10)), ("784->256->256->10", (784, 256, 256, 10))]
LR = 0.01
# Transformer MLP blocks: x (BLOCK_BATCH, 512) -> Linear(512, 2048) -> activation -> Linear(2048, 512), MSE loss
# against a target (convert() fuses the first Linear with its GELU or SiLU into LinearGELU / LinearSiLU).
BLOCKS = [("transformer MLP 512->2048->512 GELU", nn.GELU), ("transformer MLP 512->2048->512 SiLU", nn.SiLU)]
BLOCK_WIDTHS = (512, 2048, 512)
BLOCK_BATCH, QUICK_BLOCK_BATCH = 2048, 64
# The gated MLP of LLaMA-style models: x (BLOCK_BATCH, 512) -> down(silu(gate(x)) * up(x)), hidden 1376, no biases
# (convert() makes its gate and up one linear_glu and its down projection a FusedLinear), float32 and bfloat16.
LLAMA = ("LLaMA MLP 512->1376->512 SiLU", 512, 1376)
LLAMA_DTYPES = (torch.float32, torch.bfloat16)


class LlamaMLP(nn.Module):
    """LLaMA's MLP as the transformers library writes it (config.mlp_bias: bias; ACT2FN[config.hidden_act]:
    act_fn, an nn.SiLU by default). The tests convert it too."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, act_fn: Optional[nn.Module] = None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def block(activation: Callable[[], nn.Module]) -> nn.Sequential:
    d, hidden, _ = BLOCK_WIDTHS
    return nn.Sequential(nn.Linear(d, hidden), activation(), nn.Linear(hidden, d))


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               loss_fn: Callable = nn.CrossEntropyLoss()) -> Callable[[], torch.Tensor]:
    """One SGD step of `model` on (x, y) per call, returning the loss before the step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              loss_fn: Callable = nn.CrossEntropyLoss()) -> Callable[[], torch.Tensor]:
    """The float64 truth of the first step's loss: a float64 copy of `model`, taken now (before any
    implementation trains), on x in float64."""
    model64, x64 = copy.deepcopy(model).double(), x.double()

    def truth() -> torch.Tensor:
        with torch.no_grad():
            return loss_fn(model64(x64), y.double() if y.is_floating_point() else y)
    return truth


def cases(device: Device, quick: bool = False) -> List[Case]:
    torch.manual_seed(0)
    device = torch.device(device)
    out = []
    for label, widths in MODELS:
        native = mlp(widths).to(device)
        x = torch.randn(BATCH, widths[0], device=device)
        y = torch.randint(0, widths[-1], (BATCH,), device=device)
        truth = reference(native, x, y)  # before convert(), which may share the native model's parameters
        impls = {OURS: train_step(customlayers.convert(native), x, y),
                 "native": train_step(copy.deepcopy(native), x, y),
                 "torch.compile": train_step(torch.compile(copy.deepcopy(native)), x, y)}
        size = BATCH * sum(a * b for a, b in zip(widths, widths[1:]))  # multiply-adds of the forward
        out.append(Case(OP, size, torch.float32, MODE, impls, label=label, reference=truth,
                        k=max(widths)))
    batch = QUICK_BLOCK_BATCH if quick else BLOCK_BATCH
    for label, activation in BLOCKS:
        native = block(activation).to(device)
        x = torch.randn(batch, BLOCK_WIDTHS[0], device=device)
        y = torch.randn(batch, BLOCK_WIDTHS[-1], device=device)
        mse = nn.MSELoss()
        truth = reference(native, x, y, mse)
        impls = {OURS: train_step(customlayers.convert(native), x, y, mse),
                 "native": train_step(copy.deepcopy(native), x, y, mse),
                 "torch.compile": train_step(torch.compile(copy.deepcopy(native)), x, y, mse)}
        size = batch * sum(a * b for a, b in zip(BLOCK_WIDTHS, BLOCK_WIDTHS[1:]))
        out.append(Case(OP, size, torch.float32, MODE, impls, label=label, reference=truth, k=max(BLOCK_WIDTHS)))
    label, d, hidden = LLAMA
    for dtype in LLAMA_DTYPES:
        native = LlamaMLP(d, hidden).to(device)
        x = torch.randn(batch, d, device=device)
        y = torch.randn(batch, d, device=device)
        mse = nn.MSELoss()
        truth = reference(native, x, y, mse)
        native, x, y = native.to(dtype), x.to(dtype), y.to(dtype)
        impls = {OURS: train_step(customlayers.convert(native), x, y, mse),
                 "native": train_step(copy.deepcopy(native), x, y, mse),
                 "torch.compile": train_step(torch.compile(copy.deepcopy(native)), x, y, mse)}
        out.append(Case(OP, batch * 3 * d * hidden, dtype, MODE, impls, label=label, reference=truth, k=hidden))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .run import main as run_main
    run_main(argv, default_ops=[OP])


if __name__ == "__main__":
    main()
