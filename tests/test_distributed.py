"""Multi-process training over models built from our layers gives the single-process result: DDP, FSDP2
(fully_shard), activation checkpointing, a sharded checkpoint loaded into an unsharded model, and tensor
parallelism (the ops' DTensor sharding rules, ColwiseParallel on LinearReLU); and docs/scale.md's torchrun
command trains.

Two processes, started once per device for every check: gloo on CPU, and NCCL on two GPUs where there
are two. Each rank runs every check, records "ok" or the traceback, and each test asserts one check's
record on both ranks. Training runs in float64, so the comparisons differ
only by the order of floating-point sums."""
import copy
import datetime
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import customlayers
from customlayers import functional as F
from customlayers.nn import CenteredLayer, LinearReLU, MyLinear, convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
STEPS = 3
DTYPE = torch.float64
# Our sharding rules serve with the compiled library; the fallback's ops are aten ops, which DTensor shards
# its own way (other output placements, the same values).
RULES = customlayers._ops.loaded()
SHARDED_OPS = tuple(op for op in customlayers._ops.OPS if op != "masked_uniform_")  # every op with rules


def _model(device) -> nn.Module:
    """A convert()ed MLP (LinearReLU), MyLinear, CenteredLayer and an nn.Linear head, seeded."""
    torch.manual_seed(0)
    mlp = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()))
    return nn.Sequential(mlp, MyLinear(16, 12), CenteredLayer(), nn.Linear(12, 4)).to(device, DTYPE)


class Checkpointed(nn.Module):
    """Runs `inner` under activation checkpointing: its activations are recomputed in backward."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


def _checkpointed(model: nn.Module) -> nn.Module:
    return nn.Sequential(*(Checkpointed(block) for block in model))


def _data(device):
    """STEPS batches, one half per rank: every rank draws all of them, as the single process does."""
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(STEPS, WORLD, 6, 8, generator=g, dtype=DTYPE), torch.randn(STEPS, WORLD, 6, 4, generator=g, dtype=DTYPE)
    return xs.to(device), ys.to(device)


def _train(model, xs, ys, ranks):
    """SGD steps on the mean of the losses of `ranks`' halves (all of them: the single process; its own:
    a rank, whose gradients DDP and FSDP2 average over the ranks)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(nn.functional.mse_loss(model(xs[step, r]), ys[step, r]) for r in ranks) / len(ranks)
        loss.backward()
        opt.step()
    return model


def _full(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_same_training(model, reference):
    """Parameters after training and the last step's gradients equal the single process's."""
    params = list(model.parameters())
    assert len(params) == len(list(reference.parameters()))
    for p, q in zip(params, reference.parameters()):
        torch.testing.assert_close(_full(p.detach()), q.detach())
        torch.testing.assert_close(_full(p.grad), q.grad)


def _reference(device, checkpointed=False):
    model = _model(device)
    xs, ys = _data(device)
    return _train(_checkpointed(model) if checkpointed else model, xs, ys, range(WORLD))


def _ddp(rank, device, workdir, checkpointed=False):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model(device)
    model = DDP(_checkpointed(model) if checkpointed else model, device_ids=[rank] if device.type == "cuda" else None)
    _train(model, *_data(device), [rank])
    _assert_same_training(model.module, _reference(device, checkpointed))


def _fsdp2(rank, device, workdir, checkpointed=False):
    from torch.distributed.fsdp import fully_shard
    model = _model(device)
    if checkpointed:
        model = _checkpointed(model)
    for block in model:
        if any(True for _ in block.parameters()):
            fully_shard(block)
    fully_shard(model)
    _train(model, *_data(device), [rank])
    _assert_same_training(model, _reference(device, checkpointed))
    return model


def _sharded_state_dict_loads_unsharded(rank, device, workdir):
    """An FSDP2 model's full state_dict, and its sharded one saved with DCP, load into a plain model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    model = _fsdp2(rank, device, workdir)
    reference = _reference(device)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = _model(device)
    plain.load_state_dict(full)
    for p, q in zip(plain.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    path = os.path.join(workdir, f"dcp-{device.type}")
    dcp.save(get_model_state_dict(model), checkpoint_id=path)
    dist.barrier()
    plain = _model(device)
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=path, no_dist=True)
    plain.load_state_dict(state)
    x = _data(device)[0][0, 0]
    torch.testing.assert_close(plain(x), reference(x))


def _mesh(device):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (WORLD,))


def _linear_act_sharding_rules(rank, device, workdir):
    """linear_act on DTensors: column-sharded weight, batch-sharded x and replicated inputs give the rules'
    output placements and the single-process values and gradients (of x too or not)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = _mesh(device)
    torch.manual_seed(2)
    x, w, b = (torch.randn(*shape, device=device, dtype=DTYPE) for shape in ((6, 3, 8), (16, 8), (16,)))
    grad = torch.randn(6, 3, 16, device=device, dtype=DTYPE)
    for act, x_grad in (("relu", True), ("none", True), ("relu", False), ("gelu", True), ("tanh", True)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        expected = customlayers.reference.linear_act(leaves[0], leaves[1].t(), leaves[2], act)
        expected.backward(grad)
        for (px, pw, pb), out in (((Replicate(), Shard(0), Shard(0)), Shard(2)),   # nn.Linear weight Shard(0)
                                  ((Shard(0), Replicate(), Replicate()), Shard(0)),
                                  ((Shard(1), Replicate(), Replicate()), Shard(1)),
                                  ((Replicate(), Replicate(), Replicate()), Replicate())):
            dx, dw, db = (distribute_tensor(t, mesh, [p]).requires_grad_() for t, p in ((x, px), (w, pw), (b, pb)))
            dx.requires_grad_(x_grad)
            y = F.linear_act(dx, dw.t(), db, act)
            assert y.placements == (out,) or not RULES, (act, px, pw, y.placements)
            torch.testing.assert_close(y.full_tensor(), expected.detach())
            y.backward(distribute_tensor(grad, mesh, [out]))
            for d, leaf in zip((dx, dw, db), leaves):
                if d.requires_grad:
                    torch.testing.assert_close(d.grad.full_tensor(), leaf.grad)


def _linear_glu_sharding_rules(rank, device, workdir):
    """linear_glu on DTensors: hidden-sharded weights (nn.Linear's, Shard(0), as ColwiseParallel shards a LLaMA
    MLP's gate_proj and up_proj), batch-sharded x and replicated inputs give the rules' output placements and
    the single-process values and gradients."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = _mesh(device)
    torch.manual_seed(3)
    x, wg, wu, bg, bu = (torch.randn(*shape, device=device, dtype=DTYPE)
                         for shape in ((6, 3, 8), (16, 8), (16, 8), (16,), (16,)))
    grad = torch.randn(6, 3, 16, device=device, dtype=DTYPE)
    for act in ("silu", "gelu", "relu"):
        leaves = [t.clone().requires_grad_() for t in (x, wg, wu, bg, bu)]
        expected = customlayers.reference.linear_glu(*leaves, act, True)
        expected.backward(grad)
        for (px, pw), out in (((Replicate(), Shard(0)), Shard(2)), ((Shard(0), Replicate()), Shard(0)),
                              ((Replicate(), Replicate()), Replicate())):
            placements = (px, pw, pw, pw if pw != Replicate() else Replicate(), pw if pw != Replicate() else Replicate())
            inputs = [distribute_tensor(t, mesh, [p]).requires_grad_() for t, p in zip((x, wg, wu, bg, bu), placements)]
            y = F.linear_glu(*inputs, act, True)
            assert y.placements == (out,) or not RULES, (act, px, pw, y.placements)
            torch.testing.assert_close(y.full_tensor(), expected.detach())
            y.backward(distribute_tensor(grad, mesh, [out]))
            for d, leaf in zip(inputs, leaves):
                torch.testing.assert_close(d.grad.full_tensor(), leaf.grad)


def _centered_sharding_rules(rank, device, workdir):
    """centered on DTensors: sharded on a dim it does not average over, it stays sharded; averaging over
    the sharded dim, DTensor gathers it first. Values and gradients are the single process's."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = _mesh(device)
    torch.manual_seed(4)
    x, grad = torch.randn(6, 4, 5, device=device, dtype=DTYPE), torch.randn(6, 4, 5, device=device, dtype=DTYPE)
    for dim, placement, out in (((1, 2), Shard(0), Shard(0)), ((-1,), Shard(1), Shard(1)), (None, Shard(0), Replicate()),
                                ((0,), Shard(0), Replicate())):
        leaf = x.clone().requires_grad_()
        expected = customlayers.reference.centered(leaf, dim)
        expected.backward(grad)
        dx = distribute_tensor(x, mesh, [placement]).requires_grad_()
        y = F.centered(dx, dim)
        assert y.placements == (out,) or not RULES, (dim, placement, y.placements)
        torch.testing.assert_close(y.full_tensor(), expected.detach())
        y.backward(distribute_tensor(grad, mesh, [out]))
        torch.testing.assert_close(dx.grad.full_tensor(), leaf.grad)


def _colwise_linear_relu_then_rowwise_linear(rank, device, workdir):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    torch.manual_seed(3)
    model = nn.Sequential(LinearReLU(8, 16), nn.Linear(16, 8)).to(device, DTYPE)
    reference = copy.deepcopy(model)
    parallelize_module(model, _mesh(device), {"0": ColwiseParallel(), "1": RowwiseParallel()})
    x = torch.randn(6, 8, device=device, dtype=DTYPE)
    y = model(x)
    torch.testing.assert_close(y, reference(x))
    y.square().sum().backward()
    reference(x).square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(_full(p.grad), q.grad)


CHECKS = {
    "ddp": _ddp,
    "ddp_activation_checkpointing": lambda *a: _ddp(*a, checkpointed=True),
    "fsdp2": _fsdp2,
    "fsdp2_activation_checkpointing": lambda *a: _fsdp2(*a, checkpointed=True),
    "sharded_state_dict_loads_unsharded": _sharded_state_dict_loads_unsharded,
    "linear_act_sharding_rules": _linear_act_sharding_rules,
    "linear_glu_sharding_rules": _linear_glu_sharding_rules,
    "centered_sharding_rules": _centered_sharding_rules,
    "colwise_linear_relu_then_rowwise_linear": _colwise_linear_relu_then_rowwise_linear,
}


def _worker(rank, device_type, workdir):
    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=WORLD,
                            init_method=f"file://{os.path.join(workdir, 'store')}",
                            timeout=datetime.timedelta(seconds=120))
    try:
        for name, check in CHECKS.items():
            try:
                check(rank, device, workdir)
                result = "ok"
            except Exception:
                result = traceback.format_exc()
            with open(os.path.join(workdir, f"{name}.{rank}"), "w") as f:
                f.write(result)
            dist.barrier()
    finally:
        dist.destroy_process_group()


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < WORLD,
                              reason=f"NCCL runs need {WORLD} GPUs; this machine has {torch.cuda.device_count()}")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=TWO_GPUS)])
def results(request, tmp_path_factory):
    """Every check's record, {name: [rank 0's, rank 1's]}, from one run of two processes."""
    if not dist.is_available():
        pytest.skip("this torch is built without torch.distributed")
    workdir = str(tmp_path_factory.mktemp(f"dist-{request.param}"))
    # Forked on CPU (no second import of torch: most of the time otherwise); CUDA needs spawned processes.
    context = mp.start_processes(_worker, args=(request.param, workdir), nprocs=WORLD, join=False,
                                 start_method="spawn" if request.param == "cuda" else "fork")
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes did not finish within 600 s")
    records = {}
    for name in CHECKS:
        paths = [os.path.join(workdir, f"{name}.{rank}") for rank in range(WORLD)]
        records[name] = [open(p).read() if os.path.exists(p) else "not run" for p in paths]
    return records


@pytest.mark.parametrize("check", CHECKS)
def test_two_processes_equal_one(results, check):
    for rank, record in enumerate(results[check]):
        assert record == "ok", f"rank {rank}:\n{record}"


def test_sharding_rules_registered_with_dtensor():
    """With the compiled library, importing DTensor (after customlayers here) registers the ops' rules;
    without it the ops are the references' aten ops, which DTensor shards itself."""
    from torch.distributed.tensor import DTensor
    strategies = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
    for name in SHARDED_OPS:
        assert (customlayers._ops.op(name) in strategies) == customlayers._ops.loaded(), name


@pytest.mark.parametrize("first", ["customlayers", "torch.distributed.tensor"])
def test_sharding_rules_registered_in_either_import_order(first):
    """In a fresh interpreter, whichever of customlayers and torch.distributed.tensor is imported first."""
    second = "torch.distributed.tensor" if first == "customlayers" else "customlayers"
    code = (f"import {first}; import {second}; import customlayers; from torch.distributed.tensor import DTensor\n"
            "s = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs\n"
            "print(all((customlayers._ops.op(n) in s) == customlayers._ops.loaded()\n"
            f"          for n in {SHARDED_OPS!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stdout + out.stderr[-3000:]


def test_torchrun_example_trains():
    """docs/scale.md's command: torchrun (torch.distributed.run) with two processes on this machine."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                          "examples/train_distributed.py", "--steps", "2"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    assert f"ddp on {WORLD} " in out.stdout and "step 2/2" in out.stdout, out.stdout
