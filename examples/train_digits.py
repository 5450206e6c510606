"""Train the book's MLP on scikit-learn's bundled digits (8x8 images of 0-9, no download) three ways —
native PyTorch, customlayers.convert()ed, and built from MyLinear — from the same initial weights and the
same batches, printing test accuracy, time per epoch and the speed-up over native, and save the loss curves
beside a bar chart of the time per epoch as a PNG.

The setting is the book's: an MLP with 256 hidden units trained by minibatch SGD on batches of 256. The
training set is the 1437 training images and their copies shifted by one pixel each way (7185 images, 29
batches an epoch). Only the training steps are timed (forward, loss, backward, SGD step; the batches are
cut beforehand), with Python's garbage collector off; the three models take turns epoch by epoch, in a
rotating order, so that a busy machine slows them alike; the first epoch is a warm-up and not counted.

    pip install --no-build-isolation ".[demo]"   # scikit-learn, tqdm, matplotlib
    python examples/train_digits.py [--epochs 20] [--out digits_loss.png] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Dict, Iterable, List, Sequence

import torch
from torch import nn

import customlayers
from customlayers.nn import MyLinear

SEED = 0
HIDDEN = 256


def shifted(images: torch.Tensor) -> torch.Tensor:
    """The images and their copies shifted by one pixel up, down, left and right (zeros shifted in)."""
    grid = images.reshape(-1, 8, 8)
    copies = [grid]
    for dim, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        moved = torch.roll(grid, step, dims=dim)
        edge = [slice(None)] * 3
        edge[dim] = 0 if step == 1 else -1
        moved[tuple(edge)] = 0
        copies.append(moved)
    return torch.cat(copies).reshape(-1, 64)


def load_digits(device: torch.device, augment: bool = True):
    """(X_train, y_train, X_test, y_test): 1437 training images (with augment, also their four one-pixel
    shifts: 7185) and 360 test images, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this demo needs scikit-learn: pip install --no-build-isolation '.[demo]' (or make demo)")
    data = sklearn_digits()
    split = train_test_split(data.data / 16.0, data.target, test_size=0.2, random_state=SEED, stratify=data.target)
    X_train, X_test, y_train, y_test = (torch.as_tensor(a, device=device) for a in split)
    X_train, y_train = X_train.float(), y_train.long()
    if augment:
        X_train, y_train = shifted(X_train), y_train.repeat(5)
    return X_train.contiguous(), y_train, X_test.float(), y_test.long()


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


def train(nets: Dict[str, nn.Module], data, epochs: int, batch_size: int, lr: float) -> Dict[str, Dict[str, List[float]]]:
    """Minibatch SGD of every model on the same batches in the same order. Each epoch's batches are cut
    first; then the models take turns, one epoch each, in an order that rotates every epoch; only their
    training steps are timed, with the garbage collector off."""
    X_train, y_train, X_test, y_test = data
    opts = {name: torch.optim.SGD(model.parameters(), lr=lr) for name, model in nets.items()}
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(SEED)
    histories = {name: {"loss": [], "accuracy": [], "seconds": []} for name in nets}
    names = list(nets)
    bar = progress(range(epochs), epochs, "training")
    for epoch in bar:
        batches = [(X_train[idx], y_train[idx]) for idx in torch.randperm(len(X_train), generator=order).split(batch_size)]
        for name in names[epoch % len(names):] + names[:epoch % len(names)]:
            model, opt = nets[name], opts[name]
            total = torch.zeros(())
            gc.disable()
            try:
                start = time.perf_counter()
                for X, y in batches:
                    loss = loss_fn(model(X), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.detach()
                seconds = time.perf_counter() - start
            finally:
                gc.enable()
            h = histories[name]
            h["seconds"].append(seconds)
            h["loss"].append(total.item() / len(batches))
            h["accuracy"].append(accuracy(model, X_test, y_test))
        bar.set_postfix_str(", ".join(f"{n} {histories[n]['accuracy'][-1]:.1f}%" for n in names))
    return histories


def per_epoch(seconds: Sequence[float]) -> float:
    """Median time per epoch, the first (warm-up) epoch left out when there are others."""
    timed = sorted(seconds[1:] or seconds)
    return timed[len(timed) // 2]


def plot(histories: Dict[str, Dict[str, List[float]]], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install --no-build-isolation '.[demo]')")
        return
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, h), style in zip(histories.items(), ("-", "--", ":")):
        curves.plot(range(1, len(h["loss"]) + 1), h["loss"], style, label=f"{name} ({h['accuracy'][-1]:.1f}%)")
    curves.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss (test accuracy)")
    curves.grid(True, alpha=0.3)
    curves.legend()
    names = list(histories)
    ms = [per_epoch(histories[n]["seconds"]) * 1e3 for n in names]
    drawn = bars.bar(names, ms, color=["tab:gray", "tab:blue", "tab:orange"][:len(names)])
    bars.bar_label(drawn, labels=[f"{t:.1f} ms\n{ms[0] / t:.2f}x" for t in ms], padding=2)
    bars.set(ylabel="ms per epoch (median)", title="training time per epoch", ylim=(0, max(ms) * 1.25))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"loss curves and times saved to {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256, help="the book's 256")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-augment", action="store_true", help="the 1437 images only, without their shifts")
    parser.add_argument("--out", default="digits_loss.png", help="PNG of the loss curves and the times")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    data = load_digits(device, augment=not args.no_augment)
    steps = -(-len(data[0]) // args.batch_size)
    print(f"digits: {len(data[0])} training, {len(data[2])} test images of 8x8 pixels; "
          f"MLP 64 -> {HIDDEN} -> ReLU -> 10, SGD lr {args.lr}, batch {args.batch_size} ({steps} steps an epoch), "
          f"{args.epochs} epochs; {torch.get_num_threads()} threads; customlayers backend: {customlayers.backend()}")
    histories = train(models(data[0].shape[1], 10), data, args.epochs, args.batch_size, args.lr)
    native = per_epoch(histories["native"]["seconds"])
    for name, h in histories.items():
        t = per_epoch(h["seconds"])
        print(f"{name:>9}: test accuracy {h['accuracy'][-1]:.2f}%, final loss {h['loss'][-1]:.4f}, "
              f"{t * 1e3:.1f} ms per epoch (median), {native / t:.2f}x native")
    spread = max(h["accuracy"][-1] for h in histories.values()) - min(h["accuracy"][-1] for h in histories.values())
    print(f"accuracy spread between the three: {spread:.2f} points")
    plot(histories, args.out, f"MLP 64-{HIDDEN}-10 on digits, batch {args.batch_size}, "
                              f"{torch.get_num_threads()} thread(s), backend {customlayers.backend()}")


if __name__ == "__main__":
    main()
