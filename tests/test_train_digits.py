"""examples/train_digits.py, briefly: the three MLPs (native, convert()ed, MyLinear) train to the same
accuracy and the loss curves are saved."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn (the demo's data set) is not installed: pip install '.[demo]'")
def test_three_ways_reach_the_same_accuracy(tmp_path):
    png = tmp_path / "loss.png"
    # One thread: batches of 32 gain nothing from more, and the test must not oversubscribe a busy machine.
    out = subprocess.run([sys.executable, "examples/train_digits.py", "--epochs", "2", "--out", str(png)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy = dict(re.findall(r"^\s*(\S+): test accuracy ([\d.]+)%", out.stdout, re.M))
    assert set(accuracy) == {"native", "convert()", "MyLinear"}, out.stdout
    values = [float(v) for v in accuracy.values()]
    assert max(values) - min(values) <= 1.0, accuracy
    assert min(values) > 80, accuracy  # it learned: 10 classes, chance is 10%
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0


def test_text_progress_bar(capsys):
    """The bar used when tqdm is not installed."""
    spec = importlib.util.spec_from_file_location("train_digits", os.path.join(ROOT, "examples", "train_digits.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    bar = demo._TextBar(range(3), 3, "native")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix_str(f"loss {i}")
    assert seen == [0, 1, 2]
    err = capsys.readouterr().err
    assert f"native [{'#' * 30}] 3/3 loss 2" in err and err.endswith("\n")
