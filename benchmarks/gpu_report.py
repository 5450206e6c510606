"""Turns what benchmarks/gpu_check.sh brought back (summary.txt, perf.json, sanitizer.log, ...) into the
committed results: benchmarks/results/<gpu>/gpu_check.{json,md} and the sanitizer summary, with each goal
of the GPU work measured as a ratio from the same run.

    python -m benchmarks.gpu_report FOLDER [--results-dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .harness import RESULTS_DIR, _slug, format_time


@dataclasses.dataclass
class Goal:
    text: str
    section: str
    metric: str
    target: float
    where: Callable[[Dict[str, object]], bool] = lambda row: True


GOALS = [
    Goal("hand-written GEMM vs cuBLAS, float32 4096³ (TF32 off)", "gemm", "fraction_of_cublas", 0.8,
         lambda r: r.get("dtype") == "float32"),
    Goal("hand-written GEMM vs cuBLAS, float16 4096³", "gemm", "fraction_of_cublas", 0.6,
         lambda r: r.get("dtype") == "float16"),
    Goal("hand-written GEMM vs cuBLAS, bfloat16 4096³", "gemm", "fraction_of_cublas", 0.6,
         lambda r: r.get("dtype") == "bfloat16"),
    Goal("LinearReLU fwd+bwd vs eager, batch ≤256 and dims ≤1024", "linear_act", "speedup_vs_eager", 1.2,
         lambda r: r.get("size") == "small"),
    Goal("LinearReLU fwd+bwd vs eager, large sizes", "linear_act", "speedup_vs_eager", 0.9,
         lambda r: r.get("size") == "large"),
    Goal("centered vs the copy bandwidth, ≥64M elements", "centered", "fraction_of_copy", 0.85),
    Goal("masked_uniform_ vs the fill bandwidth, ≥64M elements", "masked_uniform_", "fraction_of_fill", 0.8),
    Goal("masked_uniform_ vs the book's uniform_ + mask", "masked_uniform_", "speedup_vs_book", 4.0),
]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def goal_rows(results: Sequence[Dict[str, object]]) -> List[List[str]]:
    """One row per goal: the worst measured value over its cases, the target, and whether it is met."""
    rows = []
    for goal in GOALS:
        values = [r[goal.metric] for r in results
                  if r["section"] == goal.section and goal.where(r) and isinstance(r.get(goal.metric), float)]
        if not values:
            rows.append([goal.text, "not measured", f"≥ {goal.target:g}", "?"])
            continue
        worst = min(values)
        rows.append([goal.text, f"{worst:.2f}" + (f" (of {len(values)})" if len(values) > 1 else ""),
                     f"≥ {goal.target:g}", "yes" if worst >= goal.target else "**no**"])
    for r in results:
        if r["section"] == "graphs":
            rows.append([f"CUDA graphs: {r['name']}", "ok" if r.get("ok") else "**failed**", "ok",
                         "yes" if r.get("ok") else "**no**"])
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _gpu_line(summary: Optional[str]) -> str:
    match = re.search(r"^gpu: (.*)$", summary or "", re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def sanitizer_summary(log: Optional[str]) -> List[str]:
    """compute-sanitizer's closing lines ('========= ERROR SUMMARY: 0 errors'), each with its step header."""
    lines = []
    for line in (log or "").splitlines():
        if line.startswith("=== ") or "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line:
            lines.append(line.strip())
    return lines


def markdown(perf: Dict[str, object], summary: Optional[str], sanitizer: List[str]) -> str:
    meta, results = perf["meta"], perf["results"]
    lines = [f"# GPU check on {meta['device']}", "",
             f"{meta['date_utc']} · GPU, driver, memory: {_gpu_line(summary)} · torch {meta['torch']} "
             f"(CUDA {meta.get('cuda')}) · commit {meta['commit']} · min_run_time {meta['min_run_time']} s"
             + (" · **smoke run: sizes too small to mean anything**" if meta.get("smoke") else "") + ".",
             "", "Produced by `benchmarks/gpu_check.sh` (one call) and `python -m benchmarks.gpu_report`; "
             "raw numbers in `gpu_check.json`. Ratios above 1 favour customlayers.", "", "## Goals", ""]
    lines += _table(["goal", "measured (worst case)", "target", "met"], goal_rows(results))
    for section in dict.fromkeys(r["section"] for r in results):
        rows = [r for r in results if r["section"] == section]
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("section", "name", "times")]
        impls = list(dict.fromkeys(i for r in rows for i in r.get("times", {})))
        lines += ["", f"## {section}", ""]
        lines += _table(["case", *impls, *keys],
                        [[r["name"], *(format_time(r["times"][i]) if i in r.get("times", {}) else "" for i in impls),
                          *(_fmt(r[k]) if k in r else "" for k in keys)] for r in rows])
    if summary:
        lines += ["", "## Steps", "", "```", *[line for line in summary.splitlines() if not line.startswith("    ")],
                  "```"]
    if sanitizer:
        lines += ["", "## compute-sanitizer", "", "```", *sanitizer, "```"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="what gpu_check.sh wrote into $OUT")
    parser.add_argument("--results-dir", type=Path, help="default: benchmarks/results/<gpu>/")
    args = parser.parse_args(argv)
    perf = json.loads((args.folder / "perf.json").read_text())
    read = lambda name: (args.folder / name).read_text() if (args.folder / name).exists() else None  # noqa: E731
    summary, sanitizer = read("summary.txt"), sanitizer_summary(read("sanitizer.log"))
    out = args.results_dir or RESULTS_DIR / _slug(perf["meta"]["device"])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.folder / "perf.json", out / "gpu_check.json")
    if summary:
        (out / "gpu_check_steps.txt").write_text(summary)
    (out / "gpu_check.md").write_text(markdown(perf, summary, sanitizer))
    print(f"results in {out}")
    return out


if __name__ == "__main__":
    main()
