"""Shared benchmark harness: time several implementations of an op on the same inputs, check each one's
output (customlayers' too) against a float64 reference of the case, and write JSON, markdown and PNG
results under benchmarks/results/<device_name>/."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import re
import shutil
import statistics
import sys
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils import benchmark

import customlayers
from customlayers import _cpu

OURS = "customlayers"
FWD, FWD_BWD = "fwd", "fwd+bwd"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

Device = Union[str, torch.device]


# ----------------------------------------------------------------------------------------- naming

def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|@.*$", " ", text.lower())  # "Intel(R) Xeon(R) ... @ 2.60GHz"
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


# AMD's CPUs under a hypervisor are all named "AMD EPYC": their core generation, from the CPUID family and
# model in /proc/cpuinfo, tells them apart (AMD's documented family/model ranges).
_AMD_ZEN = ((25, range(0x00, 0x10), "Zen 3"), (25, range(0x20, 0x60), "Zen 3"), (25, range(0x10, 0x20), "Zen 4"),
            (25, range(0x60, 0x80), "Zen 4"), (25, range(0xA0, 0xB0), "Zen 4"), (26, range(0x00, 0x100), "Zen 5"))


def _cpu_model() -> str:
    """The CPU's model name, with its core generation when the name alone does not say it (e.g. 'AMD EPYC
    Zen 5'), or the CPUID family and model where that is unknown."""
    fields = _cpu.cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if fields.get("vendor_id") == "AuthenticAMD" and name.strip() == "AMD EPYC":
        family, model = int(fields.get("cpu family", "0")), int(fields.get("model", "0"))
        zen = next((z for f, models, z in _AMD_ZEN if f == family and model in models), None)
        name += f" {zen}" if zen else f" (family {family}, model {model})"
    return name


def describe_device(device: Device) -> str:
    """Human-readable device, e.g. 'NVIDIA H100 80GB HBM3' or 'AMD EPYC, 2 threads'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} threads"


def device_name(device: Device) -> str:
    """Filesystem-safe device name for the results folder, e.g. 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-zen-5-2c'."""
    device = torch.device(device)
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(_cpu_model())}-{torch.get_num_threads()}c"


def size_label(n: int) -> str:
    """1024 -> '1K', 16777216 -> '16M'."""
    for suffix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def format_time(seconds: float) -> str:
    """Three significant digits in s, ms, µs or ns."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


# ----------------------------------------------------------------------------------------- cases

@dataclasses.dataclass
class Truth:
    """The float64 ground truth of one output tensor, and `slack`: an optional float64 tensor of the same
    shape, per-element deviations that are not errors on top of the dtype's tolerance (e.g. what ReLU mask
    flips at pre-activations within rounding of zero may legitimately change in a gradient)."""
    value: torch.Tensor
    slack: Optional[torch.Tensor] = None


@dataclasses.dataclass
class Ceiling:
    """What the machine's memory allows: a plain PyTorch call moving `bytes_moved` bytes (a fill of the
    same tensor, a copy between two of its size), timed with the case's implementations (interleaved, not
    judged, not a baseline), so that customlayers' bandwidth reads as a fraction of it."""
    name: str
    fn: Callable[[], object]
    bytes_moved: int


@dataclasses.dataclass
class Case:
    """One measurement point: every callable in `impls` takes no argument and runs on the SAME inputs
    (customlayers first by convention: it is the one the speedups are relative to).

    Correctness: every implementation's warm-up output, customlayers' included, is judged against the
    case's float64 `reference` (a zero-argument callable returning the ground truth of the outputs from the
    same inputs: a tensor, a Truth, or a tuple of them, shaped like each implementation's output) with the
    dtype's tolerance (`tolerance(dtype, k)`, k: the longest sum in an output, e.g. a GEMM's inner
    dimension). Ops whose outputs are random have no value reference: `check` (output -> None, or why it
    is wrong) tests properties instead, again for every implementation. Implementations in `unchecked`
    compute only part of the op (a GEMM floor, a fill without the mask) and are not judged."""
    op: str
    size: int                              # x axis of the plot (e.g. numel)
    dtype: torch.dtype
    mode: str                              # FWD or FWD_BWD
    impls: Dict[str, Callable[[], object]]
    bytes_moved: Optional[int] = None      # for customlayers' achieved bandwidth
    label: str = ""                        # defaults to size_label(size)
    reference: Optional[Callable[[], object]] = None
    check: Optional[Callable[[object], Optional[str]]] = None
    k: int = 1
    unchecked: Tuple[str, ...] = ()
    ceiling: Optional[Ceiling] = None      # needs bytes_moved

    def __post_init__(self) -> None:
        if self.ceiling is not None and (not self.bytes_moved or self.ceiling.name in self.impls):
            raise ValueError("a ceiling needs the case's bytes_moved and a name of its own")
        self.label = self.label or size_label(self.size)
        unknown = set(self.unchecked) - set(self.impls)
        if unknown:
            raise ValueError(f"unchecked names no implementation of the case: {sorted(unknown)}")


@dataclasses.dataclass
class Result:
    """Timings of one Case: per implementation median/IQR in seconds; speedup = baseline / customlayers."""
    op: str
    size: int
    label: str
    dtype: str
    mode: str
    times: Dict[str, Dict[str, float]]
    errors: Dict[str, str]                 # implementations that raised (not timed)
    mismatches: Dict[str, str]             # implementations whose output fails the check (ours included)
    speedup: Dict[str, float]
    bytes_moved: Optional[int]
    bandwidth_gbs: Optional[float]
    correctness: str = ""                  # how outputs were judged (see Case)
    tolerance: Optional[float] = None      # with a float64 reference: tolerance(dtype, k)
    unchecked: List[str] = dataclasses.field(default_factory=list)
    # with a Ceiling: its name, times, GB/s, and customlayers' bandwidth as a fraction of it
    ceiling: Optional[Dict[str, object]] = None


def bind(fns: Dict[str, Callable], inputs: Sequence[torch.Tensor], mode: str,
         grad_outputs: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, Callable[[], object]]:
    """Zero-argument callables running each fn on `inputs`: the forward alone (FWD), or forward plus
    ``torch.autograd.grad`` w.r.t. the inputs that require grad (FWD_BWD; nothing accumulates in .grad)."""
    if mode == FWD:
        return {name: (lambda fn=fn: fn(*inputs)) for name, fn in fns.items()}
    if mode != FWD_BWD or grad_outputs is None:
        raise ValueError(f"mode must be {FWD!r} or {FWD_BWD!r} (with grad_outputs), got {mode!r}")
    wrt = [t for t in inputs if t.requires_grad]
    return {name: (lambda fn=fn: torch.autograd.grad(fn(*inputs), wrt, grad_outputs)) for name, fn in fns.items()}


def compile_fresh(fn: Callable, **compile_kwargs) -> Callable:
    """``torch.compile`` on a private copy of fn. Dynamo caches graphs per code object, so compiling one
    function for many shapes would share one cache: past recompile_limit (8) it silently runs eager."""
    code = fn.__code__.replace()  # a new code object, hence a new Dynamo cache
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(copy, **compile_kwargs)


# ----------------------------------------------------------------------------------------- timing

def _progress(done: int, total: int, text: str, width: int = 30) -> None:
    filled = width * done // max(total, 1)
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}"
    columns = shutil.get_terminal_size((100, 20)).columns - 1
    sys.stderr.write("\r" + line[:columns].ljust(columns))
    sys.stderr.flush()


def _measure(fn: Callable[[], object], min_run_time: float) -> Dict[str, float]:
    # Timer syncs the accelerator around each measurement; its num_threads defaults to 1, not torch's.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median": m.median, "iqr": m.iqr, "mean": m.mean, "measurements": len(m.times),
            "runs_per_measurement": m.number_per_run}


# ----------------------------------------------------------------------------------------- correctness

# Tolerance of an output, as a fraction of the float64 reference's largest magnitude (the absolute part)
# and of each element (the relative part): long sums (a GEMM's dot products over thousands of terms,
# summed in different orders by different implementations) differ by rounding relative to their terms,
# not to each result, which cancellation can make small. float32: 1e-4 (about 1,700 unit roundoffs);
# float16 (unit roundoff 2^-11 ~ 4.9e-4): 1e-2; bfloat16 (2^-8 ~ 3.9e-3): 2e-2; both accumulated in float32
# by every implementation here, so these are several roundings of the output; float64: 1e-12.
BASE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Past some sum length the rounding of the accumulation itself takes over: a k-term sum's rounding error
# grows like sqrt(k) unit roundoffs of its terms' magnitudes in practice (k in the worst case, which real
# GEMMs, blocked and summed in float32 or better, stay far from), so the tolerance is at least
# K_FACTOR * sqrt(k) * u(accumulation dtype). In float32 that passes 1e-4 at k ~ 40,000, beyond every
# benchmark's size (the longest sum has 8192 terms; eager float32's forward at 8192x4096->4096 is within
# 2.2e-7 of the scale).
K_FACTOR = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of `dtype` values are accumulated in: float32 for float16 and bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tolerance(dtype: torch.dtype, k: int = 1) -> float:
    """The tolerance of an output of `dtype` whose elements are sums of up to k terms (see BASE_TOLERANCE)."""
    base = BASE_TOLERANCE.get(dtype, 1e-4)
    return max(base, K_FACTOR * math.sqrt(max(k, 1)) * unit_roundoff(accumulation_dtype(dtype)))


def _as_tuple(v: object) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _mismatch(out: object, truth: object, dtype: torch.dtype, k: int = 1) -> Optional[str]:
    """Why `out` (a tensor or a tuple of them) is wrong against the float64 `truth` (tensors or Truths,
    shaped alike), None when it is right: each element must be within
    tol * max|truth| + tol * |truth| + slack of the truth, tol = tolerance(dtype, k)."""
    tol = tolerance(dtype, k)
    outs, truths = _as_tuple(out), _as_tuple(truth)
    if len(outs) != len(truths):
        return f"{len(outs)} outputs, expected {len(truths)}"
    for i, (o, t) in enumerate(zip(outs, truths)):
        t = t if isinstance(t, Truth) else Truth(t)
        where = f"output {i}: " if len(outs) > 1 else ""
        if not isinstance(o, torch.Tensor):
            return f"{where}{type(o).__name__}, expected a tensor"
        if tuple(o.shape) != tuple(t.value.shape):
            return f"{where}shape {tuple(o.shape)}, expected {tuple(t.value.shape)}"
        if not o.numel():
            continue
        ref = t.value.detach().to(device=o.device, dtype=torch.float64)
        err = (o.detach().to(torch.float64) - ref).abs()
        scale = ref.abs().max().item() or 1.0
        allowed = tol * scale + tol * ref.abs()
        if t.slack is not None:
            allowed = allowed + t.slack.to(device=o.device, dtype=torch.float64)
        bad = ~(err <= allowed)  # NaN counts as wrong
        if bad.any():
            n_bad, worst = int(bad.sum()), err.nan_to_num(math.inf).max().item()
            return (f"{where}{n_bad} of {o.numel()} elements beyond tolerance, off by up to {worst / scale:.3g} "
                    f"of the reference's largest magnitude {scale:.4g} (tolerance {tol:.3g} of it)")
    return None


def _correctness(case: Case) -> str:
    if case.reference is not None:
        return f"float64 reference, tolerance {tolerance(case.dtype, case.k):.3g} of its largest magnitude"
    return "property check" if case.check is not None else "not checked"


# Each implementation is timed in ROUNDS interleaved rounds (ours, baseline, ..., ours, baseline, ...)
# and its time is the median of its round medians: a drift of the machine's speed during a case (other
# load, frequency, a sleeping OpenMP worker) then shifts every implementation alike instead of whichever
# happened to be measured at the time.
ROUNDS = 5


def _combine(rounds: List[Dict[str, float]]) -> Dict[str, float]:
    medians = [r["median"] for r in rounds]
    return {"median": statistics.median(medians), "iqr": statistics.median(r["iqr"] for r in rounds),
            "mean": statistics.fmean(r["mean"] for r in rounds),
            "measurements": sum(r["measurements"] for r in rounds),
            "runs_per_measurement": rounds[-1]["runs_per_measurement"], "round_medians": medians}


def run_cases(cases: Sequence[Case], min_run_time: float, progress: bool = True) -> List[Result]:
    """Time every implementation of every case, after one warm-up call (which compiles torch.compile
    and whose output is checked as Case describes, customlayers' too), in ROUNDS interleaved rounds."""
    total, done = sum(len(_timed(c)) for c in cases) * ROUNDS, 0
    results = []
    for case in cases:
        rounds: Dict[str, List[Dict[str, float]]] = {}
        errors: Dict[str, str] = {}
        mismatches: Dict[str, str] = {}
        where = f"{case.op} {case.mode} {case.label} {_dtype_name(case.dtype)}"

        def fail(name: str, exc: Exception) -> None:  # one failing baseline must not lose the others
            errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            rounds.pop(name, None)
            print(f"\n{where} {name} failed: {errors[name]}", file=sys.stderr)

        truth, judged = None, case.reference is not None or case.check is not None
        if case.reference is not None:
            try:
                truth = case.reference()
            except Exception as exc:
                judged = False
                print(f"\n{where} reference failed, outputs not checked: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
        timed = _timed(case)
        for name, fn in timed.items():
            try:
                out = fn()
                if judged and name in case.impls and name not in case.unchecked:
                    try:
                        why = case.check(out) if truth is None else _mismatch(out, truth, case.dtype, case.k)
                    except Exception as exc:  # an output the check cannot read is wrong, not a failed run
                        why = f"check raised {type(exc).__name__}: {exc}".splitlines()[0]
                    if why:
                        mismatches[name] = why
                        print(f"\n{where} {name}: wrong output: {why}", file=sys.stderr)
                del out
                rounds[name] = []
            except Exception as exc:  # e.g. no compiler for torch.compile
                fail(name, exc)
        del truth
        for _ in range(ROUNDS):
            for name, fn in timed.items():
                if progress:
                    _progress(done, total, f"{where} {name}")
                done += 1
                if name in errors:
                    continue
                try:
                    rounds[name].append(_measure(fn, min_run_time / ROUNDS))
                except Exception as exc:
                    fail(name, exc)
        times = {name: _combine(r) for name, r in rounds.items() if r}
        results.append(_result(case, times, errors, mismatches, _correctness(case) if judged else "not checked"))
    if progress:
        _progress(done, total, "done")
        sys.stderr.write("\n")
    return results


def _timed(case: Case) -> Dict[str, Callable[[], object]]:
    """The case's implementations, and its ceiling when it has one."""
    return {**case.impls, **({case.ceiling.name: case.ceiling.fn} if case.ceiling else {})}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _result(case: Case, times: Dict[str, Dict[str, float]], errors: Dict[str, str],
            mismatches: Dict[str, str], correctness: str = "") -> Result:
    ceiling = None
    if case.ceiling is not None:
        name = case.ceiling.name
        errors.pop(name, None)  # a ceiling that failed leaves the fraction out, not a "failed" baseline
        ceiling_time = times.pop(name, {}).get("median")
        if ceiling_time:
            ceiling = {"name": name, "median": ceiling_time, "bytes_moved": case.ceiling.bytes_moved,
                       "gbs": case.ceiling.bytes_moved / ceiling_time / 1e9}
    ours = times.get(OURS, {}).get("median")
    speedup = {name: t["median"] / ours for name, t in times.items() if ours and name != OURS}
    bandwidth = case.bytes_moved / ours / 1e9 if ours and case.bytes_moved else None
    if ceiling and bandwidth:
        ceiling["fraction"] = bandwidth / ceiling["gbs"]
    return Result(case.op, case.size, case.label, _dtype_name(case.dtype), case.mode, times, errors,
                  mismatches, speedup, case.bytes_moved, bandwidth, correctness=correctness or _correctness(case),
                  tolerance=tolerance(case.dtype, case.k) if case.reference is not None else None,
                  unchecked=list(case.unchecked), ceiling=ceiling)


# ----------------------------------------------------------------------------------------- output

def results_dir(device: Device, quick: bool = False) -> Path:
    """benchmarks/results/<device_name>/ (quick runs: its quick/ subfolder)."""
    path = RESULTS_DIR / device_name(device)
    return path / "quick" if quick else path


def _impl_names(results: Sequence[Result]) -> List[str]:
    names = {OURS: None}  # ours first, then baselines in the order the cases list them
    for r in results:
        names.update(dict.fromkeys(list(r.times) + list(r.errors)))
    return [n for n in names if any(n in r.times or n in r.errors for r in results)]


def _time_cell(r: Result, name: str) -> str:
    if name in r.errors:
        return "failed"
    if name not in r.times:
        return ""
    return format_time(r.times[name]["median"]) + (" (wrong)" if name in r.mismatches else "")


def _correctness_note(results: Sequence[Result]) -> str:
    """One sentence saying how the outputs in `results` were judged."""
    tols = {}  # dtype -> tolerances of the reference-checked results
    for r in results:
        if r.tolerance is not None:
            tols.setdefault(r.dtype, set()).add(r.tolerance)
    rules = []
    if tols:
        rules.append("against a float64 reference computed from the same inputs, within "
                     + ", ".join(f"{'/'.join(f'{t:.3g}' for t in sorted(ts))} ({d})" for d, ts in tols.items())
                     + " of the reference's largest magnitude")
    if any(r.correctness == "property check" for r in results):
        rules.append("for the properties of its random fill (no value reference: no two generators draw the same "
                     "values)")
    if any(r.correctness == "not checked" for r in results):
        rules.append("some cases: not checked")
    unchecked = list(dict.fromkeys(n for r in results for n in r.unchecked))
    return (f"Correctness: each implementation's output, {OURS}' included, is checked " + "; ".join(rules)
            + (f"; except {', '.join(f'`{n}`' for n in unchecked)} (only part of the op)" if unchecked else "") + ".")


def _markdown(results: Sequence[Result], op: str, meta: Dict[str, object]) -> str:
    names = _impl_names(results)
    baselines = [n for n in names if n != OURS]
    with_bw = any(r.bandwidth_gbs for r in results)
    ops = meta["backend_report"]["ops"]
    kernels = [ops.get(o, {}).get(meta["device_type"]) for o in meta.get("ops_used") or [op]]
    backend = ("the compiled kernel" if all(k == "kernel" for k in kernels) else
               f"**the pure-PyTorch fallback** ({meta['backend_report']['reason'] or 'no kernel for this device'})")
    ceilings = list(dict.fromkeys(r.ceiling["name"] for r in results if r.ceiling))
    header = ["size", "dtype", "mode", *names, *(f"vs {b}" for b in baselines), *([f"{OURS} GB/s"] if with_bw else []),
              *([f"{' / '.join(f'`{c}`' for c in ceilings)} GB/s", "fraction of it"] if ceilings else [])]
    rows = []
    for r in results:
        cells = [r.label, r.dtype, r.mode]
        cells += [_time_cell(r, n) for n in names]
        cells += [f"{r.speedup[b]:.2f}x" if b in r.speedup else "" for b in baselines]
        if with_bw:
            cells.append(f"{r.bandwidth_gbs:.1f}" if r.bandwidth_gbs else "")
        if ceilings:
            c = r.ceiling or {}
            cells += [f"{c['gbs']:.1f}" if "gbs" in c else "", f"{c['fraction']:.0%}" if "fraction" in c else ""]
        rows.append(cells)
    lines = [
        f"## {op}",
        "",
        f"{meta['device']} · torch {meta['torch']} · {meta['date_utc']} · "
        f"min_run_time {meta.get('min_run_time', '?')} s{' (quick)' if meta.get('quick') else ''}. "
        f"`{OURS}` ran {backend}.",
        "",
        f"Median time per call (torch.utils.benchmark); `vs X` = X time / {OURS} time (above 1: {OURS} is faster).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(c) + " |" for c in rows),
    ]
    if ceilings:
        lines += ["", f"`{OURS} GB/s`: the bytes the op must move (each pass over an input or output counted) per "
                  f"second; the ceiling: the same tensor's {' / '.join(f'`{c}`' for c in ceilings)} in plain PyTorch "
                  f"(into an existing tensor), timed in the same rounds. The fraction compares the two bandwidths."]
    lines += ["", _correctness_note(results)]
    if any(r.errors or r.mismatches for r in results):
        lines += ["", f"`failed`: raised an error; `(wrong)`: output outside that tolerance (random fills: failing "
                  f"that check), whichever implementation it is. Details in `{op}.json`."]
    return "\n".join(lines) + "\n"


# The baselines a plot compares customlayers with, where a case has them (the tables list every one):
# PyTorch's own way (eager / native / nn.Linear / vmap of eager / the book's code) and torch.compile.
PLOTTED_BASELINES = ("eager", "native", "nn.Linear", "vmap of eager", "book (uniform_ + mask)", "torch.compile")


def _plot(results: Sequence[Result], op: str, meta: Dict[str, object], path: Path) -> None:
    """The speed-up of customlayers over each plotted baseline (baseline time / ours: above 1, ours is faster),
    one panel per mode, one group of bars per size and dtype, each bar from the line at 1.0x up (faster) or
    down (slower) on a log scale; a baseline whose output was wrong is hatched, one that failed is missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    modes = list(dict.fromkeys(r.mode for r in results))
    present = {n for r in results for n in r.speedup}
    baselines = [n for n in PLOTTED_BASELINES if n in present]
    colors = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(PLOTTED_BASELINES)}
    groups = {mode: [r for r in results if r.mode == mode and any(b in r.speedup for b in baselines)] for mode in modes}
    modes = [m for m in modes if groups[m]]
    widest = max((len(g) for g in groups.values()), default=1)
    fig, axes = plt.subplots(max(len(modes), 1), 1, figsize=(min(18.0, max(7.0, 0.9 * widest + 2)), 3.6 * max(len(modes), 1)),
                             squeeze=False)
    ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)]
    for ax, mode in zip(axes[:, 0], modes):
        points = groups[mode]
        bar = 0.8 / max(sum(b in r.speedup for b in baselines) for r in points)
        drawn = set()
        for i, r in enumerate(points):
            here = [b for b in baselines if b in r.speedup]
            for k, name in enumerate(here):
                ax.bar(i + (k - (len(here) - 1) / 2) * bar, r.speedup[name] - 1, bar, bottom=1, color=colors[name],
                       edgecolor="black",
                       linewidth=0.4, hatch="//" if name in r.mismatches else None,
                       label=None if name in drawn else f"vs {name}")
                drawn.add(name)
        ratios = [r.speedup[b] for r in points for b in baselines if b in r.speedup]
        low, high = min(ratios + [1.0]) / 1.3, max(ratios + [1.0]) * 1.3
        ax.axhline(1.0, color="black", linewidth=1.2)
        ax.set_yscale("log", base=2)
        ax.set_ylim(low, high)
        ax.set_yticks([t for t in ticks if low <= t <= high], [f"{t:g}x" for t in ticks if low <= t <= high])
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(range(len(points)), [f"{r.label}\n{r.dtype}" for r in points], rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(points) - 0.4)
        ax.set(title=f"{mode}: {OURS}' speed-up (baseline time / {OURS} time)",
               ylabel=f"speed-up (above 1x: {OURS} faster)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    if any(r.mismatches for r in results):
        fig.text(0.01, 0.005, "hatched: that baseline's output was outside the tolerance of the float64 reference",
                 fontsize=7)
    fig.suptitle(f"{op} on {meta['device']}, torch {meta['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(folder: Path) -> List[Path]:
    """Redraw every <op>.png of a results folder from its <op>.json (and refresh its README.md)."""
    pngs, meta = [], None
    for js in sorted(folder.glob("*.json")):
        data = json.loads(js.read_text())
        if meta is None or data["meta"]["date_utc"] > meta["date_utc"]:
            meta = data["meta"]  # the README's header: the newest run's
        results = [Result(**r) for r in data["results"]]
        _plot(results, data["meta"]["op"], data["meta"], js.with_suffix(".png"))
        pngs.append(js.with_suffix(".png"))
    if meta is not None:
        write_readme(folder, meta)
    return pngs


def write_readme(folder: Path, meta: Dict[str, object]) -> Path:
    """(Re)write folder/README.md: a header, then every <op>.md table of the folder with its plot."""
    sections = []
    for md in sorted(p for p in folder.glob("*.md") if p.name != "README.md"):
        png = md.with_suffix(".png")
        sections.append(md.read_text().rstrip() + (f"\n\n![{md.stem}]({png.name})" if png.exists() else ""))
    text = (f"# Benchmarks on {meta['device']}\n\n"
            f"Device `{meta['device_name']}` · torch {meta['torch']} · updated {meta['date_utc']}. "
            "Regenerated by `python -m benchmarks.run`; raw numbers in `<op>.json`.\n\n"
            + "\n\n".join(sections) + "\n")
    path = folder / "README.md"
    path.write_text(text)
    return path


def write_results(results: Sequence[Result], op: str, device: Device, quick: bool = False,
                  meta: Optional[Dict[str, object]] = None) -> Path:
    """Write <op>.json, <op>.md and <op>.png into results_dir(device, quick), refresh its README.md,
    and return the path of <op>.md. `meta` adds fields (e.g. min_run_time; ops_used: the customlayers ops
    a benchmark that is not named after one runs) to the metadata."""
    device = torch.device(device)
    folder = results_dir(device, quick)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "op": op,
        "device": describe_device(device),
        "device_name": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "customlayers": customlayers.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "quick": quick,
        "backend_report": customlayers.backend_report(),
        **(meta or {}),
    }
    (folder / f"{op}.json").write_text(
        json.dumps({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, indent=2) + "\n")
    md = folder / f"{op}.md"
    md.write_text(_markdown(results, op, meta))
    _plot(results, op, meta, folder / f"{op}.png")
    write_readme(folder, meta)
    return md
