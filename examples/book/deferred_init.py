"""Deferred initialization: nn.LazyLinear in the book; customlayers.nn.LazyMyLinear infers in_units the
same way, from the first input or from a checkpoint."""
import torch
from torch import nn

from customlayers.nn import LazyMyLinear, MyLinear

torch.manual_seed(0)
X = torch.rand(2, 20)

# --- the book ------------------------------------------------------------------------------------------
net = nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10))
print(net[0].weight)  # <UninitializedParameter>
assert isinstance(net[0].weight, nn.parameter.UninitializedParameter)
net(X)
assert net[0].weight.shape == (256, 20)

# --- customlayers --------------------------------------------------------------------------------------
mine = nn.Sequential(LazyMyLinear(256), LazyMyLinear(10, activation="none"))
assert isinstance(mine[0].weight, nn.parameter.UninitializedParameter)
mine(X)
assert type(mine[0]) is MyLinear and mine[0].in_units == 20 and mine[0].weight.shape == (20, 256)
assert mine[1].in_units == 256

# A fresh lazy net takes its shapes from a checkpoint, as nn.LazyLinear does.
fresh = nn.Sequential(LazyMyLinear(256), LazyMyLinear(10, activation="none"))
fresh.load_state_dict(mine.state_dict())
assert fresh[0].in_units == 20 and fresh[1].in_units == 256
assert torch.allclose(fresh(X), mine(X), atol=1e-6)
print("deferred initialization ok:", fresh)
