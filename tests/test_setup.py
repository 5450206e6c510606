"""setup.py's checks before it compiles (customlayers/_build_check.py): missing build prerequisites under
--no-build-isolation, pip's isolated build against another torch than the installed one, and the
progress line per compiled file."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("_build_check", os.path.join(ROOT, "customlayers", "_build_check.py"))
bc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bc)


def fake_find_spec(*missing):
    real = importlib.util.find_spec
    return lambda name: None if name in missing else real(name)


def test_old_setuptools_without_wheel_named_with_the_pip_command():
    missing = bc.missing_prerequisites(["bdist_wheel"], pep517=False,
                                       find_spec=fake_find_spec("setuptools.command.bdist_wheel", "wheel"))
    assert len(missing) == 1 and "bdist_wheel" in missing[0] and "setuptools >= 70.1" in missing[0]
    with pytest.raises(SystemExit) as err:
        bc.check_prerequisites(["bdist_wheel"], pep517=False,
                               find_spec=fake_find_spec("setuptools.command.bdist_wheel", "wheel"))
    assert "python -m pip install --upgrade setuptools wheel ninja" in str(err.value.code)
    assert "--no-build-isolation" in str(err.value.code)
    # Either one is enough; build_ext --inplace (make build) builds no wheel.
    assert bc.missing_prerequisites(["bdist_wheel"], False, find_spec=fake_find_spec("wheel")) == []
    assert bc.missing_prerequisites(["bdist_wheel"], False, find_spec=fake_find_spec("setuptools.command.bdist_wheel")) == []
    assert bc.missing_prerequisites(["build_ext", "--inplace"], False,
                                    find_spec=fake_find_spec("setuptools.command.bdist_wheel", "wheel")) == []
    assert bc.missing_prerequisites([], True, find_spec=fake_find_spec("setuptools.command.bdist_wheel", "wheel"))


def test_missing_torch_and_ninja(tmp_path, monkeypatch):
    missing = bc.missing_prerequisites([], False, find_spec=fake_find_spec("torch"), which=lambda name: None,
                                       python=str(tmp_path / "python"))
    assert [m.split()[0] for m in missing] == ["torch", "ninja"]
    # An unactivated venv's own bin/ninja is used: its directory goes on PATH (where cpp_extension looks).
    ninja = tmp_path / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert bc.missing_prerequisites([], False, which=lambda name: None, python=str(tmp_path / "python")) == []
    assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path)


def test_setup_py_stops_before_compiling_without_bdist_wheel(tmp_path):
    """setup.py itself, in an environment where neither setuptools' bdist_wheel nor wheel imports (as with
    setuptools 65.5 and no wheel): it exits at once with the message, instead of "invalid command"."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "wheel" or name.startswith("wheel.") or name == "setuptools.command.bdist_wheel":
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Block())
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "setup.py", "bdist_wheel", "-d", str(tmp_path / "dist")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "missing build prerequisites" in out.stderr and bc.INSTALL_TOOLS in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "dist").exists()


def test_isolated_build_against_another_torch_is_refused():
    isolated = "/tmp/pip-build-env-abc123/overlay/lib/python3.11/site-packages/torch/__init__.py"
    assert bc.in_pip_isolated_build(isolated) and not bc.in_pip_isolated_build(torch.__file__)
    assert bc.check_target_torch("0.0.1", torch.__file__) is None  # not an isolated build: not asked
    # The target environment is this interpreter's; pip's PYTHONPATH / PYTHONNOUSERSITE are dropped.
    env = {**os.environ, "PYTHONPATH": "/nonexistent", "PYTHONNOUSERSITE": "1"}
    assert bc.target_torch_version(sys.executable, env) == torch.__version__
    with pytest.raises(SystemExit) as err:
        bc.check_target_torch("0.0.1", isolated, sys.executable, env)
    message = str(err.value.code)
    assert f"torch 0.0.1" in message and f"has torch {torch.__version__}" in message
    assert "pip install --no-build-isolation ." in message
    assert bc.check_target_torch(torch.__version__, isolated, sys.executable, env) == torch.__version__
    assert bc.check_target_torch("0.0.1", isolated, sys.executable, {**env, bc.ALLOW_MISMATCH: "1"}) \
        == torch.__version__


def test_target_without_torch_is_not_refused(tmp_path):
    """pip installs the newest torch as the dependency then, the one the isolated build fetched."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    isolated = "/tmp/pip-build-env-abc123/overlay/lib/python3.11/site-packages/torch/__init__.py"
    assert bc.check_target_torch("0.0.1", isolated, str(python), dict(os.environ)) is None


@pytest.mark.skipif(shutil.which("ninja") is None, reason="ninja is not on PATH")
def test_progress_line_per_compiled_file(tmp_path, capfd):
    for name in ("a.cpp", "b.cu"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "build.ninja").write_text(textwrap.dedent(f"""
        rule cc
          command = cp $in $out && echo warning: something in $in
        rule link
          command = cat $in > $out
        build a.o: cc {tmp_path}/a.cpp
        build b.o: cc {tmp_path}/b.cu
        build lib.so: link a.o b.o
    """))
    bc.run_ninja(str(tmp_path), 1, "Error compiling objects", str(tmp_path))
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("customlayers: [")]
    assert [line.split()[1] for line in lines] == ["[1/3]", "[2/3]", "[3/3]"], out
    assert lines[0].endswith(" a.cpp") and lines[1].endswith(" b.cu") and lines[2].endswith(" step"), out
    assert "warning: something in" in out  # compiler messages are passed through
    (tmp_path / "build.ninja").write_text("rule fail\n  command = echo broken && false\nbuild x: fail\n")
    with pytest.raises(RuntimeError, match="Error compiling objects: .*broken"):
        bc.run_ninja(str(tmp_path), 1, "Error compiling objects", str(tmp_path))
