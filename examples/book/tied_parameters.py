"""Tied parameters: the book's shared layer, and the converted net, where the shared Linear becomes one
shared LinearReLU (its Parameters stay one set, gradients still add up)."""
import torch
from torch import nn

import customlayers
from customlayers.nn import LinearReLU

torch.manual_seed(0)
X = torch.rand(size=(2, 4))

# --- the book ------------------------------------------------------------------------------------------
shared = nn.LazyLinear(8)
net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.LazyLinear(1))
net(X)
print(net[2].weight.data[0] == net[4].weight.data[0])
net[2].weight.data[0, 0] = 100
assert bool((net[2].weight.data[0] == net[4].weight.data[0]).all())  # the same object, not just equal

# --- customlayers --------------------------------------------------------------------------------------
fast = customlayers.convert(net)
assert fast[2] is fast[4] and isinstance(fast[2], LinearReLU)
fast[2].weight.data[0, 1] = -7
assert fast[4].weight.data[0, 1] == -7
assert len(list(fast.parameters())) == len(list(net.parameters()))  # one weight and bias for both uses
net[2].weight.data[0, 1] = -7
assert torch.allclose(fast(X), net(X), atol=1e-6)
fast(X).sum().backward()
net(X).sum().backward()
assert torch.allclose(fast[2].weight.grad, net[2].weight.grad, atol=1e-6)  # both uses' gradients, summed
print("tied parameters ok")
