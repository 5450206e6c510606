"""Training a convert()ed MLP (LinearReLU layers) on several processes with the tools PyTorch already has:

    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py                # DDP
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --mode fsdp2   # FSDP2 (fully_shard)
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --mode tp      # tensor parallel

One GPU per process (NCCL) when there are enough of them, else CPU processes (gloo). DDP and FSDP2 give
each rank its own batch; tensor parallelism gives every rank the same batch and splits each layer's
columns (ColwiseParallel) or rows (RowwiseParallel) over the ranks. See docs/scale.md.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import customlayers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp2", "tp"), default="ddp")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"]):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")  # torchrun sets OMP_NUM_THREADS=1 per process unless told otherwise
        dist.init_process_group("gloo")

    torch.manual_seed(0)  # the same initial parameters on every rank
    model = customlayers.convert(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))).to(device)
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    elif args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model[0])
        fully_shard(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = init_device_mesh(device.type, (world,))
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})

    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    # A fixed random teacher to learn; data parallelism draws a batch per rank, tensor parallelism one batch.
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(1)).to(device)
    data = torch.Generator().manual_seed(2 + (rank if args.mode != "tp" else 0))
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=data).to(device)
        y = (x @ teacher).argmax(1)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # the sum over the ranks (gloo has no average)
            mean_loss /= world
            if rank == 0:
                print(f"{args.mode} on {world} {device.type} processes ({customlayers.backend()}): "
                      f"step {step + 1}/{args.steps}, loss {mean_loss.item():.4f}")
    dist.destroy_process_group()


def exit_without_finalizing():
    """Ends the process as torch.multiprocessing's workers do, without Python's interpreter teardown.

    After destroy_process_group a gloo worker thread can still be releasing the last collective's tensors,
    which takes the GIL; if the interpreter is finalizing by then, CPython ends that thread inside a C++
    destructor and the process aborts ("terminate called without an active exception"; pytorch/pytorch
    issue 38228). With torch 2.14 that ends about one plain-PyTorch DDP run in ten on CPU, after the
    training has finished.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_without_finalizing()
