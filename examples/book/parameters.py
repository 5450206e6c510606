"""Parameter management: access by index and by name, state_dict, grads; a converted net answers the same
questions the same way (LinearReLU is an nn.Linear with nn.Linear's parameter names)."""
import torch
from torch import nn

import customlayers
from customlayers.nn import LinearReLU

torch.manual_seed(0)
X = torch.rand(size=(2, 4))

# --- the book ------------------------------------------------------------------------------------------
net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(1))
assert net(X).shape == (2, 1)
print(net[2].state_dict())
assert type(net[2].bias) is nn.Parameter and net[2].bias.data.shape == (1,)
assert net[2].weight.grad is None
names = [(name, param.shape) for name, param in net.named_parameters()]
print(names)
assert names == [("0.weight", (8, 4)), ("0.bias", (8,)), ("2.weight", (1, 8)), ("2.bias", (1,))]

# --- customlayers: the converted net has the same parameters, names and outputs ------------------------
fast = customlayers.convert(net)
assert isinstance(fast[0], LinearReLU) and isinstance(fast[0], nn.Linear)
assert [(name, param.shape) for name, param in fast.named_parameters()] == names
assert list(fast[0].state_dict()) == ["weight", "bias"] and fast[0].in_features == 4
assert torch.allclose(fast(X), net(X), atol=1e-6)
fast(X).sum().backward()
assert fast[0].weight.grad.shape == (8, 4)
print("parameter access ok:", fast[0])
