"""A tour of customlayers: which backend runs, the book's examples, gradients, and torch.compile."""
import torch
from torch import nn

import customlayers
from customlayers.nn import CenteredLayer


def main():
    report = customlayers.backend_report()
    print(f"customlayers {customlayers.__version__} on torch {torch.__version__}: backend = {report['backend']}")
    if report["reason"]:
        print(f"  reason: {report['reason']}")
    for op, devices in report["ops"].items():
        print(f"  {op:<12} " + ", ".join(f"{d}: {k}" for d, k in devices.items()))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nThe book's CenteredLayer on {device}:")
    layer = CenteredLayer()
    print("  CenteredLayer()(tensor([1, 2, 3, 4, 5])) =", layer(torch.FloatTensor([1, 2, 3, 4, 5]).to(device)).tolist())
    net = nn.Sequential(nn.Linear(8, 128), CenteredLayer()).to(device)
    Y = net(torch.rand(4, 8, device=device))
    print(f"  Sequential(Linear(8, 128), CenteredLayer()) output mean = {Y.mean().item():.2e}")

    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    ok = torch.autograd.gradcheck(layer, (x,)) and torch.autograd.gradgradcheck(layer, (x,))
    print(f"  gradcheck + gradgradcheck (float64): {'passed' if ok else 'FAILED'}")

    compiled = torch.compile(net, fullgraph=True)
    x = torch.rand(4, 8, device=device)
    print(f"  torch.compile(fullgraph=True) matches eager: {torch.allclose(compiled(x), net(x), atol=1e-6)}")


if __name__ == "__main__":
    main()
