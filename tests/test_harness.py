"""benchmarks/harness.py's correctness rule: every implementation of a case, customlayers' included, is
judged against the case's float64 reference with the dtype's tolerance (random fills: a property check),
and the results mark the wrong ones. Tiny sizes and no real timing."""
import math

import pytest
import torch

import customlayers
from benchmarks import bench_centered, bench_linear_act, bench_masked_uniform, bench_mlp
from benchmarks.harness import (FWD, FWD_BWD, OURS, BASE_TOLERANCE, Case, Truth, _markdown, _mismatch, bind,
                                run_cases, tolerance)


def _run(case):
    return run_cases([case], min_run_time=1e-4, progress=False)[0]


def _meta():
    return {"device": "cpu", "torch": torch.__version__, "date_utc": "now", "device_type": "cpu",
            "backend_report": {"ops": {}, "reason": ""}}


def _linear_case(dtype, ours, mode=FWD, m=16, k=8, n=4):
    torch.manual_seed(0)
    x, w, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype) / k ** 0.5, torch.randn(n, dtype=dtype)
    g = torch.randn(m, n, dtype=dtype)
    inputs = (x, w, b) if mode == FWD else tuple(t.detach().requires_grad_() for t in (x, w, b))
    fns = {OURS: ours, "eager": bench_linear_act.eager}
    return Case("linear_act", m * k * n, dtype, mode, bind(fns, inputs, mode, (g,)),
                reference=bench_linear_act.reference(x, w, b, g if mode == FWD_BWD else None), k=max(m, k, n))


def test_tolerances():
    assert tolerance(torch.float32) == BASE_TOLERANCE[torch.float32] == 1e-4
    assert tolerance(torch.bfloat16) == 2e-2 and tolerance(torch.float16) == 1e-2
    assert tolerance(torch.float64) <= 1e-12
    # every benchmark's sums (at most 8192 terms) keep the base tolerance; much longer ones get sqrt(k) u
    assert tolerance(torch.float32, 8192) == 1e-4
    k = 1 << 24
    assert tolerance(torch.float32, k) == pytest.approx(8 * math.sqrt(k) * 2.0 ** -24)
    assert tolerance(torch.bfloat16, k) == 2e-2  # accumulated in float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_within_tolerance_passes(dtype):
    result = _run(_linear_case(dtype, bench_linear_act.eager))
    assert result.mismatches == {} and set(result.times) == {OURS, "eager"}
    assert "float64 reference" in result.correctness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ours_beyond_tolerance_is_flagged(dtype):
    def off(x, w, b):  # 5 tolerances of the output's scale off at one element
        out = bench_linear_act.eager(x, w, b).clone()
        out.view(-1)[3] += 5 * tolerance(dtype) * out.abs().max()
        return out
    result = _run(_linear_case(dtype, off))
    assert set(result.mismatches) == {OURS}  # ours is wrong, the accurate eager is not blamed
    assert "1 of 64 elements" in result.mismatches[OURS]
    md = _markdown([result], "linear_act", _meta())
    assert f"within {tolerance(dtype):.3g} ({str(dtype).removeprefix('torch.')})" in md
    assert result.tolerance == tolerance(dtype, 16)
    row = next(line for line in md.splitlines() if line.startswith("| 512 "))  # cells: ours, eager
    assert row.split("|")[4].strip().endswith("(wrong)") and not row.split("|")[5].strip().endswith("(wrong)")


def test_a_baseline_beyond_tolerance_is_flagged_fwd_bwd():
    torch.manual_seed(0)
    case = _linear_case(torch.float32, bench_linear_act.eager, FWD_BWD)
    case.impls["scaled"] = (lambda f=case.impls["eager"]: tuple(t * (1 + 1e-3) for t in f()))
    result = _run(case)
    assert set(result.mismatches) == {"scaled"}


def test_unchecked_and_missing_outputs():
    case = _linear_case(torch.float32, bench_linear_act.eager)
    case.impls["partial"] = lambda: torch.zeros(3)
    case.unchecked = ("partial",)
    assert _run(case).mismatches == {}
    case.unchecked = ()
    assert "shape (3,)" in _run(case).mismatches["partial"]
    with pytest.raises(ValueError):
        Case("op", 1, torch.float32, FWD, {OURS: lambda: None}, unchecked=("nope",))


def test_nan_and_slack():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    assert _mismatch(torch.tensor([1.0, -2.0, 4.0]), ref, torch.float32) is None
    assert _mismatch(torch.tensor([1.0, float("nan"), 4.0]), ref, torch.float32)
    off = torch.tensor([1.0, -2.0, 4.5])
    assert _mismatch(off, ref, torch.float32)
    assert _mismatch(off, Truth(ref, torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)), torch.float32) is None
    assert _mismatch((off, off), (ref, ref), torch.float32).startswith("output 0")


def test_relu_mask_flip_within_rounding_is_excused():
    """A pre-activation within float32 rounding of 0 may go either way: the flipped gradient passes, a
    flip at a clearly nonzero pre-activation does not."""
    m, k, n = 4, 8, 3
    torch.manual_seed(1)
    x, w, g = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64), torch.randn(m, n)
    b = -(x @ w)[0].clone()  # row 0's pre-activations are exactly 0 in float64
    b[1] += 1.0              # ... except column 1's, which is clearly active
    x, w, b = x.float(), w.float(), b.float()
    truth = bench_linear_act.reference(x, w, b, g)()

    def grads(mask):
        dz = g * mask
        return dz @ w.T, x.T @ dz, dz.sum(0)
    z = x.double() @ w.double() + b.double()
    exact = (z > 0).float()
    flipped_small, flipped_big = exact.clone(), exact.clone()
    flipped_small[0, 0] = 1 - flipped_small[0, 0]
    flipped_big[0, 1] = 1 - flipped_big[0, 1]
    assert abs(z[0, 0]) < 1e-6 and z[0, 1] > 0.5
    assert _mismatch(grads(exact), truth, torch.float32, k) is None
    assert _mismatch(grads(flipped_small), truth, torch.float32, k) is None
    assert _mismatch(grads(flipped_small), tuple(t.value for t in truth), torch.float32, k)  # slack needed
    assert _mismatch(grads(flipped_big), truth, torch.float32, k)


def test_references_of_the_benchmarks():
    """Each bench file's reference, at a tiny size, against eager: within tolerance."""
    x, g = torch.randn(64), torch.randn(64)
    assert _mismatch(bench_centered.eager(x), bench_centered.reference(x)(), torch.float32) is None
    assert _mismatch(g - g.mean(), bench_centered.reference(x, g)(), torch.float32) is None
    assert _mismatch(x, bench_centered.reference(x)(), torch.float32)
    model = bench_mlp.mlp((5, 7, 3))
    xs, ys = torch.randn(6, 5), torch.randint(0, 3, (6,))
    loss = bench_mlp.train_step(model, xs, ys)
    truth = bench_mlp.reference(model, xs, ys)
    assert _mismatch(loss(), truth(), torch.float32) is None
    case = bench_linear_act.output_layer_case(torch.device("cpu"), "MyLinear none", (8, 6, 3))
    truth = case.reference()
    for fn in case.impls.values():
        assert _mismatch(fn(), truth, torch.float32, case.k) is None


def test_masked_uniform_property_check():
    check = bench_masked_uniform.check_fill
    n = 4096
    w = torch.empty(n)
    assert check(bench_masked_uniform._filler(bench_masked_uniform.ours, w)()) is None
    assert check(bench_masked_uniform._filler(bench_masked_uniform.book, w)()) is None
    assert "below the threshold" in check(torch.empty(n).uniform_(-10, 10))  # no mask
    assert "outside" in check(torch.full((n,), 11.0))
    assert "fraction of nonzeros" in check(torch.zeros(n))
    w = bench_masked_uniform._filler(bench_masked_uniform.book, torch.empty(n))()
    assert "positive" in check(w.abs())                                 # signs lost
    assert "mean" in check(torch.where(w != 0, 5 + (w.abs() - 5) / 4, w) * w.sign())  # squeezed toward 5
    assert "non-finite" in check(torch.full((n,), float("nan")))
    assert check(torch.empty(0)) is None


def test_masked_uniform_cases_flag_a_bad_fill():
    case = bench_masked_uniform.cases("cpu", quick=True)[0]
    assert case.unchecked == ("uniform_ alone",)
    w = torch.empty(case.size)
    case.impls["unmasked"] = bench_masked_uniform._filler(bench_masked_uniform.uniform_only, w)
    result = _run(case)
    assert set(result.mismatches) == {"unmasked"} and result.correctness == "property check"
    case.impls[OURS] = bench_masked_uniform._filler(bench_masked_uniform.uniform_only, w)
    assert OURS in _run(case).mismatches


def test_speed_up_chart_and_replot(tmp_path):
    # The chart draws one bar per plotted baseline and case from the line at 1.0x (up: ours faster), hatches a
    # wrong baseline's bar and leaves out partial implementations; --replot redraws it from the JSON alone.
    import dataclasses
    import json

    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from benchmarks import harness, run

    def result(label, mode, speedup, mismatches=()):
        times = {OURS: {"median": 1.0}, **{n: {"median": v} for n, v in speedup.items()}}
        return harness.Result("linear_act", 1, label, "float32", mode, times, {}, {n: "off" for n in mismatches},
                              speedup, None, None)

    results = [result("a", FWD, {"eager": 2.0, "torch.compile": 0.5, "GEMM floor": 0.9}),
               result("b", FWD_BWD, {"eager": 1.5}, mismatches=("eager",))]
    drawn = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, path, **kwargs):
        drawn["bars"] = [[(round(p.get_y(), 6), round(p.get_y() + p.get_height(), 6), p.get_hatch())
                          for p in ax.patches] for ax in fig.axes]
        return real_savefig(fig, path, **kwargs)

    plt.Figure.savefig = capture
    try:
        harness._plot(results, "linear_act", _meta(), tmp_path / "linear_act.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert drawn["bars"] == [[(1.0, 2.0, None), (1.0, 0.5, None)], [(1.0, 1.5, "//")]]
    meta = {**_meta(), "op": "linear_act", "device_name": "cpu-test"}
    (tmp_path / "linear_act.json").write_text(json.dumps({"meta": meta,
                                                          "results": [dataclasses.asdict(r) for r in results]}))
    (tmp_path / "linear_act.md").write_text("## linear_act\n")
    (tmp_path / "linear_act.png").unlink()
    run.main(["--replot", str(tmp_path)])
    assert (tmp_path / "linear_act.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![linear_act](linear_act.png)" in (tmp_path / "README.md").read_text()


def test_bandwidth_ceiling_is_timed_and_reported_apart():
    # A case's ceiling (plain PyTorch moving known bytes) is timed with the implementations but is neither a
    # baseline nor judged: it gives customlayers' bandwidth as a fraction of the machine's, in the table too.
    from benchmarks import harness

    case = bench_centered.cases("cpu", quick=True)[0]
    assert case.mode == FWD and case.ceiling.name == "copy_"
    result = _run(case)
    assert "copy_" not in result.times and "copy_" not in result.speedup and not result.mismatches
    c = result.ceiling
    assert c["gbs"] == pytest.approx(c["bytes_moved"] / c["median"] / 1e9)
    assert c["fraction"] == pytest.approx(result.bandwidth_gbs / c["gbs"])
    table = harness._markdown([result], "centered", _meta())
    assert "`copy_` GB/s | fraction of it |" in table and f"{c['fraction']:.0%} |" in table
    assert all(r.ceiling is None for r in map(_run, bench_centered.cases("cpu", quick=True)[1:2]))
    assert bench_masked_uniform.cases("cpu", quick=True)[0].ceiling.name == "fill_"
    with pytest.raises(ValueError, match="ceiling needs"):
        harness.Case("x", 1, torch.float32, FWD, {OURS: lambda: None}, ceiling=case.ceiling)


def test_every_op_is_benchmarked():
    """benchmarks.run finds every bench_*.py; each op (its backward apart) has one, or one runs it (OPS_USED)."""
    from benchmarks import run
    timed = set(run.BENCHES) | {op for m in run.BENCHES.values() for op in getattr(m, "OPS_USED", ())}
    assert timed >= {op for op in customlayers._ops.OPS if not op.endswith("_backward")}
    assert "mlp_train_step" in run.BENCHES and all(callable(m.cases) for m in run.BENCHES.values())
