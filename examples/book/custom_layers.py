"""Custom layers: the book's CenteredLayer and MyLinear next to customlayers.nn's (one fused op each,
differentiable without the book's .data)."""
import torch
from torch import nn
from torch.nn import functional as F

import customlayers.functional as CF
from customlayers.nn import CenteredLayer, MyLinear

torch.manual_seed(0)


# --- the book ------------------------------------------------------------------------------------------
class BookCenteredLayer(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, X):
        return X - X.mean()


class BookMyLinear(nn.Module):
    def __init__(self, in_units, units):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_units, units))
        self.bias = nn.Parameter(torch.randn(units,))

    def forward(self, X):
        linear = torch.matmul(X, self.weight.data) + self.bias.data
        return F.relu(linear)


# --- side by side --------------------------------------------------------------------------------------
x = torch.tensor([1.0, 2, 3, 4, 5])
layer = CenteredLayer()
print(layer(x))  # tensor([-2., -1.,  0.,  1.,  2.])
assert torch.allclose(layer(x), BookCenteredLayer()(x), atol=1e-6)
net = nn.Sequential(nn.LazyLinear(128), CenteredLayer())
Y = net(torch.rand(4, 8))
assert abs(Y.mean().item()) < 1e-6

book = BookMyLinear(5, 3)
linear = MyLinear(5, 3)
assert linear.weight.shape == book.weight.shape == (5, 3)
linear.load_state_dict(book.state_dict())  # same names and shapes
X = torch.rand(2, 5)
assert torch.allclose(linear(X), book(X), atol=1e-6)
assert torch.allclose(CF.linear_act(X, linear.weight, linear.bias), book(X), atol=1e-6)
net = nn.Sequential(MyLinear(64, 8), MyLinear(8, 1))
assert net(torch.rand(2, 64)).shape == (2, 1)

# The book's .data hides the weight from autograd; MyLinear's gradient is the real one.
linear(X).sum().backward()
assert linear.weight.grad is not None and book.weight.grad is None
print("custom layers ok")
