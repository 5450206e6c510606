"""GPUs: the book's try_gpu / try_all_gpus, shipped as customlayers.try_gpu / customlayers.try_all_gpus;
the layers run on the device they return (the CPU when there is no GPU)."""
import torch
from torch import nn

import customlayers
from customlayers.nn import CenteredLayer, MyLinear


# --- the book ------------------------------------------------------------------------------------------
def try_gpu(i=0):
    if torch.cuda.device_count() >= i + 1:
        return torch.device(f"cuda:{i}")
    return torch.device("cpu")


def try_all_gpus():
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return devices if devices else [torch.device("cpu")]


# --- customlayers --------------------------------------------------------------------------------------
assert customlayers.try_gpu() == try_gpu() and customlayers.try_gpu(10) == try_gpu(10)
assert customlayers.try_all_gpus() == try_all_gpus()
print(customlayers.try_gpu(), customlayers.try_gpu(10), customlayers.try_all_gpus())

device = customlayers.try_gpu()
X = torch.ones(2, 3, device=device)
net = nn.Sequential(MyLinear(3, 8), CenteredLayer(), nn.LazyLinear(1)).to(device)
Y = net(X)
assert Y.device == X.device and Y.shape == (2, 1)
fast = customlayers.convert(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).to(device))
assert fast[0].weight.device == X.device and fast(X).device == X.device
print("GPUs ok: ran on", device)
