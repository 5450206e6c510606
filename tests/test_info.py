"""`python -m customlayers.info`, the environment report, and the version's one source."""
import os
import re
import runpy

import customlayers
from test_build import ROOT, run_python

MAIN = "import runpy; runpy.run_module('customlayers.info', run_name='__main__')"  # python -m customlayers.info


def test_info_reports_version_build_runtime_and_every_op(capsys):
    runpy.run_module("customlayers.info", run_name="__main__")
    out = capsys.readouterr().out
    report = customlayers.backend_report()
    assert f"customlayers:    {customlayers.__version__} ({os.path.join(ROOT, 'customlayers')})" in out
    assert f"backend:         {report['backend']}" in out
    assert "torch:           " in out and "torch CUDA:" in out and "CPU:" in out
    assert ("built for torch:" in out) == os.path.exists(os.path.join(ROOT, "customlayers", "_build_info.py"))
    for op, devices in report["ops"].items():
        for device, kind in devices.items():
            assert re.search(rf"^  {op} +{device} +{kind}", out, re.M), (op, device, out)


def test_info_under_forced_fallback_says_why():
    out = run_python(MAIN, CUSTOMLAYERS_FORCE_FALLBACK="1")
    assert "backend:         fallback (CUSTOMLAYERS_FORCE_FALLBACK is set)" in out
    for op in customlayers._ops.OPS:
        for device in customlayers._ops.DEVICES:
            assert re.search(rf"^  {op} +{device} +fallback: CUSTOMLAYERS_FORCE_FALLBACK is set$", out, re.M), out


def test_version_has_one_source():
    """customlayers/__init__.py holds the version; pyproject.toml and CMakeLists.txt read it from there."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", customlayers.__version__)
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "customlayers.__version__" }' in pyproject
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    assert "project(customlayers VERSION ${_cl_version}" in cmake and "customlayers/__init__.py" in cmake
