"""Layers and blocks: the book's MLP, MySequential, FixedHiddenMLP and NestMLP, and the same blocks on
customlayers (convert() fuses each Linear feeding a ReLU; MyLinear is the book's layer on one fused op)."""
import torch
from torch import nn
from torch.nn import functional as F

import customlayers
from customlayers.nn import FusedLinear, LinearReLU, MyLinear

torch.manual_seed(0)
X = torch.rand(2, 20)


# --- the book ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.LazyLinear(256)
        self.out = nn.LazyLinear(10)

    def forward(self, X):
        return self.out(F.relu(self.hidden(X)))


class MySequential(nn.Module):
    def __init__(self, *args):
        super().__init__()
        for idx, module in enumerate(args):
            self.add_module(str(idx), module)

    def forward(self, X):
        for module in self.children():
            X = module(X)
        return X


class FixedHiddenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.rand_weight = torch.rand((20, 20))
        self.linear = nn.LazyLinear(20)

    def forward(self, X):
        X = self.linear(X)
        X = F.relu(X @ self.rand_weight + 1)
        X = self.linear(X)
        while X.abs().sum() > 1:
            X /= 2
        return X.sum()


class NestMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.LazyLinear(32), nn.ReLU())
        self.linear = nn.LazyLinear(16)

    def forward(self, X):
        return self.linear(self.net(X))


net = MLP()
assert net(X).shape == (2, 10)
seq = MySequential(nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10))
assert seq(X).shape == (2, 10)
fixed = FixedHiddenMLP()
assert fixed(X).dim() == 0
chimera = nn.Sequential(NestMLP(), nn.LazyLinear(20), FixedHiddenMLP())
assert chimera(X).dim() == 0

# --- customlayers: the same blocks, fused (lazy layers need their first input before convert) ----------
# Each Linear feeding a ReLU becomes a LinearReLU, each output layer (at most 16 outputs) a FusedLinear.
fast, fused = customlayers.convert(net, report=True)
assert fused == ["hidden", "out"] and isinstance(fast.hidden, LinearReLU) and isinstance(fast, MLP)
assert isinstance(fast.out, FusedLinear)
assert torch.allclose(fast(X), net(X), atol=1e-6)

fast_seq, fused = customlayers.convert(seq, report=True)
assert fused == ["0", "2"] and isinstance(list(fast_seq.children())[1], nn.Identity)
assert torch.allclose(fast_seq(X), seq(X), atol=1e-6)

# FixedHiddenMLP's while loop cannot be traced: convert searches inside it and fuses NestMLP's pairs (and,
# where the CPU kernels' float32 GEMM beats BLAS's, runs the other Linears on it too: linears=None).
fast_chimera, fused = customlayers.convert(chimera, report=True)
assert {"0.net.0", "0.net.2", "0.linear"} <= set(fused)
assert torch.allclose(fast_chimera(X), chimera(X), atol=1e-6)
assert list(fast_chimera.state_dict()) == list(chimera.state_dict())  # checkpoints load both ways


class MyMLP(nn.Module):  # the MLP on the book's custom layer
    def __init__(self):
        super().__init__()
        self.hidden = MyLinear(20, 256)
        self.out = MyLinear(256, 10, activation="none")

    def forward(self, X):
        return self.out(self.hidden(X))


mine = MyMLP()
mine.hidden.weight.data.copy_(net.hidden.weight.t())  # MyLinear's weight is (in, out): the transpose
mine.hidden.bias.data.copy_(net.hidden.bias)
mine.out.weight.data.copy_(net.out.weight.t())
mine.out.bias.data.copy_(net.out.bias)
assert torch.allclose(mine(X), net(X), atol=1e-6)
print("layers and blocks: MLP, MySequential, FixedHiddenMLP, NestMLP ok; fused:", fused)
