"""Run the op benchmarks and write results under benchmarks/results/<device_name>/.

    python -m benchmarks.run [--quick] [--ops centered ...] [--device cpu|cuda|all] [--min-run-time S]
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

import torch

from .harness import ROUNDS, replot, results_dir, run_cases, write_results


def _benches() -> Dict[str, ModuleType]:
    """Every benchmarks/bench_*.py, by the name of what it times (its OP): each has cases(device, quick) ->
    List[Case], and OPS_USED (the ops it runs) when that is not OP alone."""
    modules = [importlib.import_module(f".{info.name}", __package__)
               for info in pkgutil.iter_modules([str(Path(__file__).parent)]) if info.name.startswith("bench_")]
    benches = {module.OP: module for module in modules}
    assert len(benches) == len(modules), f"two benchmarks time the same OP: {[m.__name__ for m in modules]}"
    return benches


BENCHES = _benches()
QUICK_MIN_RUN_TIME = 0.05
FULL_MIN_RUN_TIME = 1.0


def _devices(choice: str) -> List[str]:
    if choice != "all":
        return [choice]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def main(argv: Optional[Sequence[str]] = None, default_ops: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer sizes, min-run-time {QUICK_MIN_RUN_TIME} s, results in <device>/quick/")
    parser.add_argument("--ops", nargs="+", choices=sorted(BENCHES), default=default_ops or list(BENCHES))
    parser.add_argument("--device", choices=("cpu", "cuda", "all"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, metavar="S",
                        help=f"seconds per measurement (default {FULL_MIN_RUN_TIME}, --quick {QUICK_MIN_RUN_TIME})")
    parser.add_argument("--replot", nargs="+", metavar="FOLDER", type=Path,
                        help="only redraw the plots (and README.md) of these results folders from their JSON")
    args = parser.parse_args(argv)
    if args.replot:
        for folder in args.replot:
            print("\n".join(str(p) for p in replot(folder)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    min_run_time = args.min_run_time or (QUICK_MIN_RUN_TIME if args.quick else FULL_MIN_RUN_TIME)

    tables = []
    for device in _devices(args.device):
        for op in args.ops:
            results = run_cases(BENCHES[op].cases(torch.device(device), args.quick), min_run_time)
            md = write_results(results, op, device, quick=args.quick,
                               meta={"min_run_time": min_run_time, "rounds": ROUNDS,
                                     "ops_used": getattr(BENCHES[op], "OPS_USED", [op])})
            tables.append(md.read_text())
        print(f"results in {results_dir(device, args.quick)}", flush=True)
    print("\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
