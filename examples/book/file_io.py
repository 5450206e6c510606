"""File I/O: the book's tensors, lists, dicts and a model's state_dict, plus a training checkpoint with
optimizer state, all loaded with torch.load(..., weights_only=True); a converted model's checkpoint loads
into the book's model and back."""
import os
import tempfile

import torch
from torch import nn
from torch.nn import functional as F

import customlayers

torch.manual_seed(0)
os.chdir(tempfile.mkdtemp())  # the files below go to a scratch directory


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.LazyLinear(256)
        self.output = nn.LazyLinear(10)

    def forward(self, x):
        return self.output(F.relu(self.hidden(x)))


# --- the book ------------------------------------------------------------------------------------------
x = torch.arange(4)
torch.save(x, "x-file")
x2 = torch.load("x-file", weights_only=True)
assert torch.equal(x2, x)
y = torch.zeros(4)
torch.save([x, y], "x-files")
x2, y2 = torch.load("x-files", weights_only=True)
assert torch.equal(x2, x) and torch.equal(y2, y)
mydict = {"x": x, "y": y}
torch.save(mydict, "mydict")
assert torch.equal(torch.load("mydict", weights_only=True)["y"], y)

net = MLP()
X = torch.randn(size=(2, 20))
Y = net(X)
torch.save(net.state_dict(), "mlp.params")
clone = MLP()
clone.load_state_dict(torch.load("mlp.params", weights_only=True))
assert torch.equal(clone(X), Y)

# --- customlayers: a converted model's checkpoints load both ways --------------------------------------
fast = customlayers.convert(net)
fast.load_state_dict(torch.load("mlp.params", weights_only=True))
assert torch.allclose(fast(X), Y, atol=1e-6)
torch.save(fast.state_dict(), "fast.params")
back = MLP()
back.load_state_dict(torch.load("fast.params", weights_only=True))
back(X)
assert torch.allclose(back(X), Y, atol=1e-6)

# A training checkpoint: model, optimizer state (momentum buffers) and the epoch, weights_only=True.
optimizer = torch.optim.SGD(fast.parameters(), lr=0.1, momentum=0.9)
for _ in range(2):
    optimizer.zero_grad()
    fast(X).square().mean().backward()
    optimizer.step()
torch.save({"model": fast.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}, "checkpoint.pt")
checkpoint = torch.load("checkpoint.pt", weights_only=True)
resumed = MLP()
resumed(X)  # materialize the lazy layers, then fuse
resumed = customlayers.convert(resumed)
resumed.load_state_dict(checkpoint["model"])
resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
resumed_optimizer.load_state_dict(checkpoint["optimizer"])
assert checkpoint["epoch"] == 2
for model, opt in ((fast, optimizer), (resumed, resumed_optimizer)):  # one more step: identical
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()
assert torch.allclose(resumed(X), fast(X), atol=1e-6)
print("file I/O ok")
