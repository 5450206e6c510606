"""Build prerequisites, checked by setup.py before it compiles anything (standard library only: it runs
before torch is imported, and where torch is missing).

- ``check_prerequisites``: a torch, ninja, and, for a wheel (``pip install``), setuptools with
  ``bdist_wheel`` (setuptools >= 70.1) or the ``wheel`` package. Under ``--no-build-isolation`` pip installs
  none of pyproject.toml's build requirements, and without them the build fails late and obscurely
  ("error: invalid command 'bdist_wheel'"). The message names the pip command that installs them.
- ``check_target_torch``: in pip's isolated build environment (``pip install .`` without
  ``--no-build-isolation``) the torch built against is whatever pip fetched, not the one installed where the
  package goes; the extension would then refuse to load ("built for torch X but torch Y is installed"). The
  target environment's torch is asked for (its interpreter, sys.executable, without pip's build
  environment) and a different one refuses the build, saying how to build against it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, List, Mapping, Optional, Sequence

INSTALL_TOOLS = "python -m pip install --upgrade setuptools wheel ninja"
ALLOW_MISMATCH = "CUSTOMLAYERS_ALLOW_TORCH_MISMATCH"


class BuildPrerequisiteError(SystemExit):
    """Raised with the message for the user; a SystemExit so that setup.py stops without a traceback."""


def _has_module(find_spec: Callable[[str], object], name: str) -> bool:
    try:
        return find_spec(name) is not None
    except ImportError:
        return False


def _builds_wheel(argv: Sequence[str], pep517: bool) -> bool:
    return pep517 or any(a in ("bdist_wheel", "editable_wheel") for a in argv)


def missing_prerequisites(argv: Sequence[str], pep517: bool,
                          find_spec: Callable[[str], object] = importlib.util.find_spec,
                          which: Callable[[str], Optional[str]] = shutil.which,
                          python: str = sys.executable) -> List[str]:
    """What is missing, one line each (empty: nothing). Puts the interpreter's own bin/ninja (a venv's,
    when the venv is not activated) on PATH, where torch.utils.cpp_extension looks for it."""
    missing = []
    if not _has_module(find_spec, "torch"):
        missing.append("torch (the extension is compiled against the torch it is installed with): "
                       "python -m pip install torch")
    if _builds_wheel(argv, pep517) and not _has_module(find_spec, "setuptools.command.bdist_wheel") \
            and not _has_module(find_spec, "wheel"):
        missing.append("bdist_wheel, to build the wheel pip installs: setuptools >= 70.1 or the wheel package")
    if which("ninja") is None:
        own = os.path.join(os.path.dirname(python), "ninja")
        if os.path.exists(own) and os.access(own, os.X_OK):
            os.environ["PATH"] = os.pathsep.join([os.path.dirname(python), os.environ.get("PATH", "")])
        else:
            missing.append("ninja (compiles the sources in parallel): the ninja package")
    return missing


def check_prerequisites(argv: Sequence[str] = tuple(sys.argv[1:]), pep517: Optional[bool] = None, **kw) -> None:
    if pep517 is None:
        pep517 = "setuptools.build_meta" in sys.modules
    missing = missing_prerequisites(argv, pep517, **kw)
    if missing:
        raise BuildPrerequisiteError(
            "customlayers: cannot build, missing build prerequisites:\n  - " + "\n  - ".join(missing)
            + f"\nInstall them into the environment you install customlayers into, then build again:\n"
            f"  {INSTALL_TOOLS}\n  python -m pip install torch   # if torch is missing\n"
            "  python -m pip install --no-build-isolation .")


def in_pip_isolated_build(torch_file: str) -> bool:
    """pip's isolated build environment: a temporary pip-build-env-* directory holding the build's torch."""
    return "pip-build-env-" in os.path.realpath(torch_file)


def target_torch_version(python: str = sys.executable, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """torch.__version__ in the environment of `python` outside pip's build environment (pip points
    PYTHONPATH at a sitecustomize that hides the real site-packages, and sets PYTHONNOUSERSITE), or None
    when it has no torch."""
    env = dict(os.environ if env is None else env)
    for name in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME"):
        env.pop(name, None)
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], env=env,
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None


def check_target_torch(build_version: str, torch_file: str, python: str = sys.executable,
                       env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Raises when a pip isolated build compiles against another torch than the target environment's.
    Returns the target's version (None when not an isolated build, or the target has no torch: pip then
    installs the newest torch, as the build did)."""
    env = os.environ if env is None else env
    if not in_pip_isolated_build(torch_file):
        return None
    target = target_torch_version(python, env)
    if target is None or target == build_version:
        return target
    message = (f"customlayers: pip's isolated build fetched torch {build_version} to compile against, but the "
               f"environment it installs into ({python}) has torch {target}; built so, the extension would not "
               f"load there. Build against the installed torch instead:\n"
               f"  {INSTALL_TOOLS}\n  python -m pip install --no-build-isolation .\n"
               f"({ALLOW_MISMATCH}=1 builds anyway.)")
    if env.get(ALLOW_MISMATCH, "").strip().lower() in ("1", "true", "yes", "on"):
        print("warning: " + message, file=sys.stderr)
        return target
    raise BuildPrerequisiteError(message)


def run_ninja(build_directory: str, workers: Optional[int], error_prefix: str, root: str) -> None:
    """What torch.utils.cpp_extension runs to compile (ninja -v, its output captured), printing instead one
    line per step ("customlayers: [3/12] 1m20s csrc/cuda/linear_act_kernel.cu") and passing compiler
    messages through; a failed build raises with all of ninja's output, as torch's does."""
    command = ["ninja", "-v"] + (["-j", str(workers)] if workers is not None else [])
    start, output = time.perf_counter(), []
    sys.stdout.flush()
    proc = subprocess.Popen(command, cwd=build_directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        output.append(line)
        match = re.match(r"\[(\d+)/(\d+)\] (.*)", line)
        if match:
            sources = [a for a in match.group(3).split() if a.endswith((".cpp", ".cu")) and os.path.isabs(a)]
            what = os.path.relpath(sources[-1], root) if sources else \
                ("linking" if re.search(r"-o \S+\.(so|pyd)\b", line) else "step")
            elapsed = int(time.perf_counter() - start)
            print(f"customlayers: [{match.group(1)}/{match.group(2)}] {elapsed // 60}m{elapsed % 60:02d}s {what}",
                  flush=True)
        elif line.strip():
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"{error_prefix}: {''.join(output)}")
