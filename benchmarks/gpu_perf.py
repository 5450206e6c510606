"""Focused performance check for one GPU call (benchmarks/gpu_check.sh), in order of value: the machine's
copy/fill/sum bandwidth, the hand-written GEMM against cuBLAS at 4096^3 (float32 without TF32, float16,
bfloat16), centered and masked_uniform_ at 64M-256M elements against those ceilings and eager PyTorch,
LinearReLU forward+backward against eager at small and large sizes, CUDA-graph capture, then
torch.compile for the cases whose goals compare with it. Each result is written to the JSON file as soon
as it is measured, so a run cut off keeps what it measured; benchmarks/gpu_report.py turns the file into
markdown with the goals.

    python -m benchmarks.gpu_perf [--out perf.json] [--only SECTION ...] [--no-compile]
    python -m benchmarks.gpu_perf --device cpu --smoke --out /tmp/perf.json   # tiny sizes: tests the script
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils import benchmark

import customlayers
from customlayers.functional import centered, linear_act
from customlayers.init import masked_uniform_
from customlayers.nn import LinearReLU

from .harness import compile_fresh, describe_device

SECTIONS = ("bandwidth", "gemm", "centered", "masked_uniform_", "linear_act", "graphs", "compile")
GEMM_SHAPE = (4096, 4096, 4096)
GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STREAM_SIZES = (1 << 26, 1 << 28)                  # 64M, 256M elements
LINEAR_SHAPES = {"small": [(256, 20, 256), (256, 1024, 1024)], "large": [(8192, 4096, 4096)]}
SMOKE = {"gemm": (64, 48, 80), "stream": (1 << 12, 1 << 14), "linear": {"small": [(8, 5, 6)], "large": [(32, 40, 24)]}}
SPLIT_K_SHAPE = (64, 1100, 96)                     # few output tiles, long K: the GEMM splits K
MAX_SPLIT_K_SLICES = 16                            # csrc/cuda/linear_act_gemm.cuh kMaxSlices


class Recorder:
    """Collects results and rewrites the JSON file after each one."""

    def __init__(self, path: Path, meta: Dict[str, object]):
        self.path = path
        self.data: Dict[str, object] = {"meta": meta, "results": []}
        self._write()

    def add(self, section: str, name: str, **fields) -> Dict[str, object]:
        row = {"section": section, "name": name, **fields}
        self.data["results"].append(row)
        self._write()
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items() if k != "times"}
        times = {k: f"{v * 1e6:.4g} us" for k, v in fields.get("times", {}).items()}
        print(f"{section:16s} {name:28s} {times} {shown}", flush=True)
        return row

    def error(self, section: str, exc: BaseException) -> None:
        self.add(section, "error", error=f"{type(exc).__name__}: {exc}".splitlines()[0])

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


class Bench:
    """Times zero-argument callables (median of torch.utils.benchmark's blocked_autorange)."""

    def __init__(self, device: torch.device, min_run_time: float):
        self.device, self.min_run_time = device, min_run_time

    def time(self, fn: Callable[[], object]) -> float:
        fn()  # warm-up: first-call allocations, torch.compile's compilation
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=self.min_run_time).median

    def times(self, impls: Dict[str, Callable[[], object]]) -> Dict[str, float]:
        return {name: self.time(fn) for name, fn in impls.items()}


def _commit() -> str:
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _meta(device: torch.device, args: argparse.Namespace) -> Dict[str, object]:
    meta = {"device": describe_device(device), "device_type": device.type, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "commit": _commit(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "min_run_time": args.min_run_time, "smoke": args.smoke,
            "backend_report": customlayers.backend_report()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    tf32=torch.backends.cuda.matmul.allow_tf32)
    return meta


# ------------------------------------------------------------------------------------------- sections

def bandwidth(rec: Recorder, bench: Bench, sizes: Sequence[int]) -> Dict[str, float]:
    """copy (read + write), fill (write) and sum (read) of float32 tensors; returns the largest size's GB/s."""
    best: Dict[str, float] = {}
    for n in sizes:
        src = torch.randn(n, device=bench.device)
        dst = torch.empty_like(src)
        for name, fn, nbytes in (("copy", lambda: dst.copy_(src), 8 * n), ("fill", lambda: dst.fill_(1.5), 4 * n),
                                 ("sum", lambda: src.sum(), 4 * n)):
            t = bench.time(fn)
            best[name] = nbytes / t / 1e9
            rec.add("bandwidth", f"{name} {n}", numel=n, times={"torch": t}, gbs=best[name])
        del src, dst
    return best


def gemm(rec: Recorder, bench: Bench, shape: Sequence[int], once: bool = False) -> None:
    """linear_act(x, w, None, 'none') (the hand-written GEMM alone) against torch.mm (cuBLAS); once: one
    call per dtype and nothing else (the workload ncu profiles)."""
    m, k, n = shape
    for dtype in GEMM_DTYPES:
        x = torch.randn(m, k, device=bench.device, dtype=dtype)
        w = torch.randn(k, n, device=bench.device, dtype=dtype) / k ** 0.5
        if once:
            linear_act(x, w, None, "none")
            rec.add("gemm", f"{m}x{k}x{n} {str(dtype)[6:]} once", dtype=str(dtype)[6:])
            continue
        ours, ref = linear_act(x, w, None, "none"), torch.mm(x.double(), w.double())
        rel_err = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
        times = bench.times({"customlayers": lambda: linear_act(x, w, None, "none"), "torch.mm": lambda: torch.mm(x, w)})
        flops = 2 * m * k * n
        rec.add("gemm", f"{m}x{k}x{n} {str(dtype)[6:]}", dtype=str(dtype)[6:], times=times, rel_err=rel_err,
                tflops={name: flops / t / 1e12 for name, t in times.items()},
                fraction_of_cublas=times["torch.mm"] / times["customlayers"])
        del x, w, ours, ref


def centered_cases(rec: Recorder, bench: Bench, sizes: Sequence[int], ceilings: Dict[str, float]) -> None:
    """The book's global mean (x - x.mean()); bytes moved: the mean reads x, the subtraction reads and writes."""
    for n in sizes:
        x = torch.randn(n, device=bench.device)
        torch.testing.assert_close(centered(x), x - x.mean(), rtol=0, atol=1e-5)
        times = bench.times({"customlayers": lambda: centered(x), "eager": lambda: x - x.mean()})
        gbs = 3 * 4 * n / times["customlayers"] / 1e9
        rec.add("centered", f"{n} float32", numel=n, times=times, gbs=gbs,
                fraction_of_copy=gbs / ceilings["copy"] if "copy" in ceilings else None,
                speedup_vs_eager=times["eager"] / times["customlayers"])
        del x


def book_masked_init(w: torch.Tensor) -> torch.Tensor:
    """The book's my_init on a weight: uniform_(-10, 10), then w *= w.abs() >= 5."""
    w.uniform_(-10, 10)
    w *= w.abs() >= 5
    return w


def masked_uniform_cases(rec: Recorder, bench: Bench, sizes: Sequence[int], ceilings: Dict[str, float]) -> None:
    for n in sizes:
        w = torch.empty(n, device=bench.device)
        masked_uniform_(w)
        kept = w[w != 0].abs()
        assert kept.numel() > 0 and kept.min() >= 5 and kept.max() <= 10, "masked_uniform_ values out of range"
        times = bench.times({"customlayers": lambda: masked_uniform_(w), "book": lambda: book_masked_init(w)})
        gbs = 4 * n / times["customlayers"] / 1e9
        rec.add("masked_uniform_", f"{n} float32", numel=n, times=times, gbs=gbs,
                fraction_of_fill=gbs / ceilings["fill"] if "fill" in ceilings else None,
                speedup_vs_book=times["book"] / times["customlayers"])
        del w


def _linear_pair(shape: Sequence[int], device: torch.device):
    """LinearReLU and nn.Sequential(nn.Linear, nn.ReLU) with the same parameters, an input and a gradient."""
    m, k, n = shape
    ours = LinearReLU(k, n, device=device)
    native = torch.nn.Sequential(torch.nn.Linear(k, n, device=device), torch.nn.ReLU())
    native[0].load_state_dict(ours.state_dict())
    x = torch.randn(m, k, device=device, requires_grad=True)
    g = torch.randn(m, n, device=device)
    return ours, native, x, g


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], object]:
    wrt = [x, *module.parameters()]
    return lambda: torch.autograd.grad(module(x), wrt, g)


def linear_cases(rec: Recorder, bench: Bench, shapes: Dict[str, List[Sequence[int]]]) -> None:
    """LinearReLU forward+backward (dX, dW, db) against nn.Linear + nn.ReLU."""
    for size, group in shapes.items():
        for shape in group:
            ours, native, x, g = _linear_pair(shape, bench.device)
            for got, expected in zip(_fwd_bwd(ours, x, g)(), _fwd_bwd(native, x, g)()):
                torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * max(1.0, shape[1] ** 0.5))
            times = bench.times({"customlayers": _fwd_bwd(ours, x, g), "eager": _fwd_bwd(native, x, g)})
            rec.add("linear_act", "{}x{}->{} fwd+bwd".format(*shape), size=size, times=times,
                    speedup_vs_eager=times["eager"] / times["customlayers"])


def graphs(rec: Recorder, device: torch.device) -> None:
    """CUDA-graph capture: masked_uniform_'s RNG advances between replays; linear_act with split K and
    centered replay their eager results; what capture allocates stays within the output plus the split-K
    workspace."""
    side = torch.cuda.Stream()
    w = torch.empty(1 << 20, device=device)
    m, k, n = SPLIT_K_SHAPE
    x = torch.randn(m, k, device=device)
    weight, bias = torch.randn(k, n, device=device) / k ** 0.5, torch.randn(n, device=device)
    c_in = torch.randn(1000, 37, device=device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graphs asks
        masked_uniform_(w), linear_act(x, weight, bias), centered(c_in, 1)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    rng_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(rng_graph):
        masked_uniform_(w)
    draws = []
    for _ in range(2):
        rng_graph.replay()
        draws.append(w.clone())
    kept = draws[1][draws[1] != 0].abs()
    rec.add("graphs", "masked_uniform_ replays", ok=bool(not torch.equal(draws[0], draws[1]) and kept.min() >= 5
                                                         and kept.max() <= 10),
            differ=bool(not torch.equal(draws[0], draws[1])))

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    gemm_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gemm_graph):
        y = linear_act(x, weight, bias)
        c_out = centered(c_in, 1)
    torch.cuda.synchronize()
    retained = torch.cuda.memory_allocated(device) - before
    peak = torch.cuda.max_memory_allocated(device) - before
    out_bytes = 4 * (m * n + c_in.numel())
    bound = out_bytes + MAX_SPLIT_K_SLICES * m * n * 4 + 8 * 512 + c_in.shape[0] * 64  # + rounding, row means
    x.copy_(torch.randn_like(x))
    gemm_graph.replay()
    torch.cuda.synchronize()
    same = bool(torch.equal(y, linear_act(x, weight, bias)) and torch.equal(c_out, centered(c_in, 1)))
    rec.add("graphs", "linear_act split-K + centered", ok=same and peak <= bound, replay_equals_eager=same,
            retained_bytes=retained, peak_bytes=peak, bound_bytes=bound, output_bytes=out_bytes)


def compile_cases(rec: Recorder, bench: Bench, stream_size: int, linear_shape: Sequence[int]) -> None:
    """torch.compile of the native code, beside ours and eager, where the goals compare with it."""
    x = torch.randn(stream_size, device=bench.device)
    eager = lambda t: t - t.mean()  # noqa: E731
    times = bench.times({"customlayers": lambda: centered(x), "eager": lambda: eager(x),
                         "torch.compile": lambda f=compile_fresh(eager, dynamic=False): f(x)})
    rec.add("compile", f"centered {stream_size}", times=times,
            speedup_vs_compile=times["torch.compile"] / times["customlayers"])
    del x
    ours, native, x, g = _linear_pair(linear_shape, bench.device)
    compiled = torch.compile(native, dynamic=False)
    times = bench.times({"customlayers": _fwd_bwd(ours, x, g), "eager": _fwd_bwd(native, x, g),
                         "torch.compile": _fwd_bwd(compiled, x, g)})
    rec.add("compile", "LinearReLU {}x{}->{} fwd+bwd".format(*linear_shape), times=times,
            speedup_vs_compile=times["torch.compile"] / times["customlayers"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_perf", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("perf.json"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests the script, measures nothing)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    parser.add_argument("--once", action="store_true", help="gemm: one call per dtype, no timing (for ncu)")
    parser.add_argument("--min-run-time", type=float, default=0.25, metavar="S")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu --smoke to test the script)")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs in float32: ours has no TF32 path
    torch.manual_seed(0)
    rec = Recorder(args.out, _meta(device, args))
    bench = Bench(device, args.min_run_time)
    stream = SMOKE["stream"] if args.smoke else STREAM_SIZES
    linear = SMOKE["linear"] if args.smoke else LINEAR_SHAPES
    ceilings: Dict[str, float] = {}
    steps = {
        "bandwidth": lambda: ceilings.update(bandwidth(rec, bench, stream)),
        "gemm": lambda: gemm(rec, bench, SMOKE["gemm"] if args.smoke else GEMM_SHAPE, args.once),
        "centered": lambda: centered_cases(rec, bench, stream, ceilings),
        "masked_uniform_": lambda: masked_uniform_cases(rec, bench, stream, ceilings),
        "linear_act": lambda: linear_cases(rec, bench, linear),
        "graphs": lambda: graphs(rec, device) if device.type == "cuda" else None,
        "compile": lambda: None if args.no_compile else compile_cases(rec, bench, stream[0], linear["small"][0]),
    }
    failed = False
    for section in SECTIONS:
        if section not in args.only:
            continue
        try:
            steps[section]()
        except Exception as exc:  # one broken section must not lose the others' measurements
            failed = True
            rec.error(section, exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = failed or any(row.get("ok") is False for row in rec.data["results"])
    print(f"results in {args.out}" + ("; FAILURES above" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
