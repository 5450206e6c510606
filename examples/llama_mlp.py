"""A LLaMA-style decoder layer's MLP, written as the transformers library writes it, converted by
customlayers.convert(): the gated unit silu(gate_proj(x)) * up_proj(x) becomes one linear_glu op and the
down projection a FusedLinear. The converted layer gives the native one's outputs and gradients, keeps its
parameter names (checkpoints load both ways) and trains the same.

Run: python examples/llama_mlp.py [--dtype bfloat16]"""
import argparse
import copy
import logging

import torch
from torch import nn

import customlayers


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayerMLPBlock(nn.Module):
    """The MLP half of a decoder layer: pre-norm, MLP, residual."""

    def __init__(self, hidden_size: int = 256, intermediate_size: int = 688):
        super().__init__()
        self.post_attention_layernorm = nn.RMSNorm(hidden_size)
        self.mlp = LlamaMLP(hidden_size, intermediate_size)

    def forward(self, x):
        return x + self.mlp(self.post_attention_layernorm(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    dtype = getattr(torch, parser.parse_args().dtype)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    native = DecoderLayerMLPBlock().to(dtype)
    converted, names = customlayers.convert(native, report=True)   # logs what it fused
    print("converted:", ", ".join(names))
    assert list(converted.state_dict()) == list(native.state_dict())

    x = torch.randn(8, 32, 256, dtype=dtype)                       # (batch, tokens, hidden)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(converted(x), native(x), **tol)
    print("outputs match the native layer")

    # Both train the same: a few SGD steps from the same weights on the same batches.
    steps = {}
    for name, model in (("native", copy.deepcopy(native)), ("converted", converted)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        losses = []
        for _ in range(5):
            batch = torch.randn(8, 32, 256, dtype=dtype)
            loss = (model(batch).float() - batch.float()).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        steps[name] = losses
    print("losses:", {name: [round(v, 4) for v in losses] for name, losses in steps.items()})
    torch.testing.assert_close(torch.tensor(steps["converted"]), torch.tensor(steps["native"]),
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=0)


if __name__ == "__main__":
    main()
