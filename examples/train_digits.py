"""Train the book's MLP on scikit-learn's bundled digits (8x8 images of 0-9, no download) three ways —
native PyTorch, customlayers.convert()ed, and built from MyLinear — from the same initial weights and the
same batches, printing test accuracy and time per epoch, and save the loss curves as a PNG.

    pip install --no-build-isolation ".[demo]"   # scikit-learn, tqdm, matplotlib
    python examples/train_digits.py [--epochs 10] [--out digits_loss.png]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Dict, Iterable, List

import torch
from torch import nn

import customlayers
from customlayers.nn import MyLinear

SEED = 0
HIDDEN = 256


def load_digits(device: torch.device):
    """(X_train, y_train, X_test, y_test): 1437 training and 360 test images, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this demo needs scikit-learn: pip install --no-build-isolation '.[demo]' (or make demo)")
    data = sklearn_digits()
    split = train_test_split(data.data / 16.0, data.target, test_size=0.2, random_state=SEED, stratify=data.target)
    X_train, X_test, y_train, y_test = (torch.as_tensor(a, device=device) for a in split)
    return X_train.float(), y_train.long(), X_test.float(), y_test.long()


def models(n_in: int, n_out: int) -> Dict[str, nn.Module]:
    """The three MLPs n_in -> HIDDEN -> ReLU -> n_out, with identical initial weights."""
    torch.manual_seed(SEED)
    native = nn.Sequential(nn.Linear(n_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_out))
    mylinear = nn.Sequential(MyLinear(n_in, HIDDEN), MyLinear(HIDDEN, n_out, activation="none"))
    with torch.no_grad():  # MyLinear's weight is (in, out): nn.Linear's transposed
        for mine, linear in zip(mylinear, (native[0], native[2])):
            mine.weight.copy_(linear.weight.t())
            mine.bias.copy_(linear.bias)
    return {"native": native, "convert()": customlayers.convert(native), "MyLinear": mylinear}


def progress(iterable: Iterable[int], total: int, desc: str):
    """tqdm when installed, else a one-line text bar on stderr."""
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False)
    except ImportError:
        return _TextBar(iterable, total, desc)


class _TextBar:
    def __init__(self, iterable: Iterable[int], total: int, desc: str):
        self.iterable, self.total, self.desc, self.postfix = iterable, total, desc, ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def __iter__(self):
        for i, item in enumerate(self.iterable):
            yield item
            filled = 30 * (i + 1) // self.total
            sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {i + 1}/{self.total} {self.postfix}")
            sys.stderr.flush()
        sys.stderr.write("\n")


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item() * 100


def train(name: str, model: nn.Module, data, epochs: int, batch_size: int, lr: float) -> Dict[str, List[float]]:
    """Minibatch SGD; every model sees the same batches in the same order (one seeded generator each)."""
    X_train, y_train, X_test, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(SEED)
    history: Dict[str, List[float]] = {"loss": [], "accuracy": [], "seconds": []}
    bar = progress(range(epochs), epochs, f"{name:>9}")
    for _ in bar:
        start, total, batches = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(X_train), generator=order).split(batch_size):
            loss = loss_fn(model(X_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        history["seconds"].append(time.perf_counter() - start)
        history["loss"].append(total / batches)
        history["accuracy"].append(accuracy(model, X_test, y_test))
        bar.set_postfix_str(f"loss {history['loss'][-1]:.3f}, test accuracy {history['accuracy'][-1]:.1f}%")
    return history


def plot(histories: Dict[str, Dict[str, List[float]]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install --no-build-isolation '.[demo]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, h), style in zip(histories.items(), ("-", "--", ":")):
        ax.plot(range(1, len(h["loss"]) + 1), h["loss"], style, label=f"{name} ({h['accuracy'][-1]:.1f}%)")
    ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="MLP on scikit-learn's digits")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"loss curves saved to {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--out", default="digits_loss.png", help="PNG of the loss curves")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    data = load_digits(device)
    print(f"digits: {len(data[0])} training, {len(data[2])} test images of 8x8 pixels; "
          f"MLP 64 -> {HIDDEN} -> ReLU -> 10, SGD lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs; "
          f"customlayers backend: {customlayers.backend()}")
    histories = {name: train(name, model, data, args.epochs, args.batch_size, args.lr)
                 for name, model in models(data[0].shape[1], 10).items()}
    for name, h in histories.items():  # the first epoch includes warm-up: time the others
        per_epoch = sorted(h["seconds"][1:] or h["seconds"])[len(h["seconds"][1:] or h["seconds"]) // 2]
        print(f"{name:>9}: test accuracy {h['accuracy'][-1]:.2f}%, final loss {h['loss'][-1]:.4f}, "
              f"{per_epoch * 1e3:.1f} ms per epoch (median)")
    spread = max(h["accuracy"][-1] for h in histories.values()) - min(h["accuracy"][-1] for h in histories.values())
    print(f"accuracy spread between the three: {spread:.2f} points")
    plot(histories, args.out)


if __name__ == "__main__":
    main()
