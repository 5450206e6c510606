"""Parameter initialization: the book's init_normal, init_constant, xavier, init_42 and my_init; on
customlayers the same initializers reach a fused LinearReLU (it is an nn.Linear), and
customlayers.init.my_init is the book's my_init in one pass over memory."""
import functools

import torch
from torch import nn

import customlayers
from customlayers.nn import MyLinear

torch.manual_seed(0)
X = torch.rand(size=(2, 4))
net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(1))
net(X)


# --- the book ------------------------------------------------------------------------------------------
def init_normal(module):
    if type(module) == nn.Linear:  # noqa: E721 (the book's test)
        nn.init.normal_(module.weight, mean=0, std=0.01)
        nn.init.zeros_(module.bias)


def init_constant(module):
    if type(module) == nn.Linear:  # noqa: E721
        nn.init.constant_(module.weight, 1)
        nn.init.zeros_(module.bias)


def init_xavier(module):
    if type(module) == nn.Linear:  # noqa: E721
        nn.init.xavier_uniform_(module.weight)


def init_42(module):
    if type(module) == nn.Linear:  # noqa: E721
        nn.init.constant_(module.weight, 42)


def my_init(m):
    if type(m) == nn.Linear:  # noqa: E721
        print("Init", *[(name, param.shape) for name, param in m.named_parameters()][0])
        nn.init.uniform_(m.weight, -10, 10)
        m.weight.data *= m.weight.data.abs() >= 5


net.apply(init_normal)
assert bool((net[0].bias == 0).all())
net.apply(init_constant)
assert bool((net[0].weight == 1).all())
net[0].apply(init_xavier)
net[2].apply(init_42)
assert bool((net[2].weight == 42).all())
net.apply(my_init)  # prints Init weight torch.Size([8, 4]) and Init weight torch.Size([1, 8])
w = net[0].weight
assert bool(((w == 0) | (w.abs() >= 5)).all())

# --- customlayers --------------------------------------------------------------------------------------
# customlayers.init.my_init: the same rule on linear layers (nn.Linear, LinearReLU, MyLinear), quiet unless
# verbose=True, which prints the book's line.
net.apply(functools.partial(customlayers.init.my_init, verbose=True))  # Init weight torch.Size([8, 4]) ...
w = net[0].weight
assert bool(((w == 0) | (w.abs() >= 5)).all()) and bool((w.abs() <= 10).all()) and bool((w != 0).any())
norm = nn.LayerNorm(8)
norm.apply(customlayers.init.my_init)
assert bool((norm.weight == 1).all())  # not a linear layer: left alone

# A converted net: isinstance(m, nn.Linear) holds for LinearReLU and FusedLinear (the output layer), so
# isinstance-based initializers reach them. The book's tests read type(m) == nn.Linear, which they fail:
# initialize before convert().
fast = customlayers.convert(net)
fast.apply(lambda m: nn.init.constant_(m.weight, 1) if isinstance(m, nn.Linear) else None)
assert bool((fast[0].weight == 1).all()) and bool((fast[2].weight == 1).all())
fast.apply(init_42)  # type(m) == nn.Linear: no layer of the converted net
assert bool((fast[0].weight == 1).all()) and bool((fast[2].weight == 1).all())

layer = MyLinear(4, 8)
layer.apply(customlayers.init.my_init)
assert bool(((layer.weight == 0) | (layer.weight.abs() >= 5)).all())
print("initialization ok")
