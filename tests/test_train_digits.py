"""examples/train_digits.py, briefly: the three MLPs (native, convert()ed, MyLinear) train to the same
accuracy, each way's time per epoch and speed-up are printed, and the plot is saved."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn (the demo's data set) is not installed: pip install '.[demo]'")
def test_three_ways_reach_the_same_accuracy(tmp_path):
    png = tmp_path / "loss.png"
    # One thread: the test must not oversubscribe a busy machine. Five epochs of 29 steps (batch 256).
    out = subprocess.run([sys.executable, "examples/train_digits.py", "--epochs", "5", "--out", str(png)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "7185 training" in out.stdout and "batch 256 (29 steps an epoch)" in out.stdout, out.stdout
    rows = re.findall(r"^\s*(\S+): test accuracy ([\d.]+)%, final loss [\d.]+, ([\d.]+) ms per epoch \(median\), "
                      r"([\d.]+)x native$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["native", "convert()", "MyLinear"], out.stdout
    values = [float(r[1]) for r in rows]
    assert max(values) - min(values) <= 1.0, rows
    assert min(values) > 70, rows  # it learned: 10 classes, chance is 10% (about 90% after five epochs)
    assert rows[0][3] == "1.00" and all(float(r[2]) > 0 for r in rows), rows  # times only: too noisy to compare
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0


def test_shifted_copies():
    demo = _load_demo()
    images = torch.zeros(1, 64)
    images[0, 9] = 1  # row 1, column 1
    out = demo.shifted(images).reshape(5, 8, 8)
    assert [tuple(map(int, (o == 1).nonzero()[0])) for o in out] == [(1, 1), (2, 1), (0, 1), (1, 2), (1, 0)]
    assert float(out.sum()) == 5
    corner = torch.zeros(1, 64)
    corner[0, 0] = 1  # row 0, column 0: shifted up or left it leaves the image (no wrap-around)
    assert float(demo.shifted(corner).sum()) == 3


def test_per_epoch_leaves_out_the_warm_up():
    demo = _load_demo()
    assert demo.per_epoch([9.0, 1.0, 3.0, 2.0]) == 2.0
    assert demo.per_epoch([5.0]) == 5.0


def _load_demo():
    return load_file("train_digits", "examples", "train_digits.py")


def test_text_progress_bar(capsys):
    """The bar used when tqdm is not installed."""
    demo = _load_demo()
    bar = demo._TextBar(range(3), 3, "native")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix_str(f"loss {i}")
    assert seen == [0, 1, 2]
    err = capsys.readouterr().err
    assert f"native [{'#' * 30}] 3/3 loss 2" in err and err.endswith("\n")
