"""Runs every CUDA kernel path once on small inputs against the float64/CPU reference: a GPU's first
correctness check and the workload for compute-sanitizer (memcheck, racecheck) in benchmarks/gpu_check.sh.
Exits non-zero if a result is wrong.

    python benchmarks/cuda_exercise.py [--quick] [--device cuda|cpu]
    python benchmarks/cuda_exercise.py --report    # only: does every op have a CUDA kernel?

--quick runs one dtype per kernel family (racecheck's slow instrumentation); --device cpu runs the same
checks on the CPU kernels, which tests this script where there is no GPU.
"""
import argparse
import sys

import torch

import customlayers
from customlayers import functional as F
from customlayers import reference


def check(name, got, expected, tol):
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol, msg=name)


def exercise_centered(dev, dtypes):
    shapes = [((7,), None), ((5000,), None), ((70000,), None), ((33, 300), [1]), ((9, 5000), [1]),
              ((300, 33), [0]), ((4, 70, 50), [1]), ((2, 3, 5, 7), [0, 2]), ((0, 3), [0])]
    tols = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 3e-3}
    for dtype in dtypes:
        tol = tols[dtype]
        for shape, dim in shapes:
            x = torch.randn(shape, device=dev).to(dtype)
            check(f"centered {shape} {dim} {dtype}", F.centered(x, dim), reference.centered(x.double(), dim), tol)
    x = torch.randn(64, 33, device=dev, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: F.centered(t, [0]), (x,))


def exercise_masked_uniform(dev, dtypes):
    from customlayers.init import masked_uniform_
    for dtype in dtypes:
        for shape in ((1,), (7,), (4099,), (33, 65), (1 << 20) + 5):
            cuda = masked_uniform_(torch.empty(shape, device=dev, dtype=dtype), seed=1234)
            cpu = masked_uniform_(torch.empty(shape, dtype=dtype), seed=1234)
            assert torch.equal(cuda.cpu(), cpu), f"masked_uniform_ {shape} {dtype}: CPU and CUDA differ"
        base = torch.zeros(40, 66, device=dev, dtype=dtype)
        view = base[1:, 1:].t()  # non-contiguous, misaligned start
        masked_uniform_(view, seed=7)
        expected = masked_uniform_(torch.empty(view.shape, dtype=dtype), seed=7)
        assert torch.equal(view.cpu(), expected), f"masked_uniform_ view {dtype}"
        assert base[0].abs().sum() == 0 and base[:, 0].abs().sum() == 0, "wrote outside the view"


def exercise_linear_act(dev, dtypes):
    # Edge tiles, K not a multiple of the tile, 1-row inputs, both weight layouts, both activations;
    # large tiles (128 x 128 for every SM) and split K (few output tiles, long K).
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    side = 128 * int(sms ** 0.5 + 1) + 3
    shapes = [(1, 1, 1), (1, 20, 256), (7, 13, 5), (65, 33, 129), (256, 20, 256), (130, 200, 70),
              (side, 24, side), (64, 1100, 96)]
    tols = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 3e-3}
    for dtype in dtypes:
        tol = tols[dtype]
        for m, k, n in shapes:
            x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
            for w in (torch.randn(k, n, device=dev, dtype=dtype), torch.randn(n, k, device=dev, dtype=dtype).t()):
                w.requires_grad_()
                b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
                for act in ("relu", "none"):
                    y = F.linear_act(x, w, b, act)
                    ref = reference.linear_act(x.double(), w.double(), b.double(), act)
                    scale = max(1.0, k ** 0.5)
                    check(f"linear_act {m}x{k}x{n} {dtype} {act}", y, ref, tol * scale)
                    g = torch.randn_like(y)
                    got = torch.autograd.grad(y, (x, w, b), g)  # every backward kernel runs, 16-bit included
                    if dtype in (torch.bfloat16, torch.float16):
                        continue  # ReLU masks of rounded outputs differ from float64's near 0: compare fp32/64
                    exp = torch.autograd.grad(ref, (x, w, b), g.double())
                    for name, a, e in zip(("dx", "dw", "db"), got, exp):
                        check(f"linear_act {name} {m}x{k}x{n} {dtype} {act}", a, e, tol * scale * max(1.0, m ** 0.5))


EXERCISES = {"centered": exercise_centered, "masked_uniform_": exercise_masked_uniform,
             "linear_act": exercise_linear_act}
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# --quick: float32 (SIMT GEMM, the float kernels) and bfloat16 (tensor-core GEMM, 16-bit loads/stores).
QUICK_DTYPES = (torch.float32, torch.bfloat16)


def missing_kernels(device_type):
    """The ops that have no compiled kernel for device_type, after printing the backend report."""
    report = customlayers.backend_report()
    print(report)
    return [op for op, devs in report["ops"].items() if devs[device_type] != "kernel"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="float32 and bfloat16 only")
    parser.add_argument("--report", action="store_true", help="only check that every op has a kernel")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_exercise.py: no CUDA device")
    missing = missing_kernels(args.device)
    if missing:
        sys.exit(f"cuda_exercise.py: no compiled {args.device} kernel for {missing}")
    if args.report:
        return
    dev = torch.device(args.device)
    for name, fn in EXERCISES.items():
        fn(dev, QUICK_DTYPES if args.quick else ALL_DTYPES)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"{name}: ok", flush=True)


if __name__ == "__main__":
    main()
