"""The build, the backend report and the automatic fallback."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

import customlayers
from customlayers import _cpu
from conftest import load_file, requires_extension, strict_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env):
    """Run `code` in a fresh interpreter (so customlayers is imported anew) and return its stdout."""
    full_env = {k: v for k, v in os.environ.items() if k != "CUSTOMLAYERS_FORCE_FALLBACK"}
    full_env.update(PYTHONPATH=ROOT, **env)
    out = subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)], env=full_env,
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_extension_in_use_when_required():
    if strict_extension():
        assert customlayers.backend() == "extension", customlayers.backend_report()
    report = customlayers.backend_report()
    assert report["backend"] in ("extension", "fallback")
    assert (report["reason"] is None) == (report["backend"] == "extension")


@requires_extension()
def test_cuda_kernels_compiled_when_required():
    """CI compiles every .cu file: CUSTOMLAYERS_EXPECT_CUDA=1 makes a CPU-only build a failure."""
    if os.environ.get("CUSTOMLAYERS_EXPECT_CUDA") != "1":
        pytest.skip("CUSTOMLAYERS_EXPECT_CUDA is not set: a CPU-only build is acceptable here")
    report = customlayers.backend_report()
    assert report["build"]["cuda"] == torch.version.cuda
    for op, devices in report["ops"].items():
        assert devices == {"cpu": "kernel", "cuda": "kernel"}, op


def test_force_fallback_env():
    out = run_python("""
        import torch, customlayers
        print(customlayers.backend())
        y = customlayers.nn.CenteredLayer()(torch.tensor([1.0, 2, 3, 4, 5]))
        print(y.tolist())
        y = customlayers.nn.CenteredLayer()(torch.tensor([1.0, 2, 3]))
    """, CUSTOMLAYERS_FORCE_FALLBACK="1")
    assert out.splitlines()[0] == "fallback"
    assert "[-2.0, -1.0, 0.0, 1.0, 2.0]" in out
    assert out.count("CUSTOMLAYERS_FORCE_FALLBACK is set") == 1  # warned once, with the reason


@requires_extension()
def test_torch_version_mismatch_falls_back_with_message():
    out = run_python("""
        import torch
        torch.__version__ = "1.0.0"
        import customlayers
        print(customlayers.backend())
        print(customlayers.backend_report()["reason"])
        print(customlayers.functional.centered(torch.tensor([1.0, 3.0])).tolist())
    """)
    assert "fallback" in out.splitlines()
    assert "built for torch" in out and "1.0.0" in out and "Rebuild" in out
    assert "[-1.0, 1.0]" in out


@requires_extension()
def test_cuda_version_mismatch_falls_back_with_message():
    if customlayers.backend_report()["build"]["cuda"] is None:
        pytest.skip("this build has no CUDA kernels, so there is no CUDA version to mismatch")
    out = run_python("""
        import torch
        torch.version.cuda = "9.9"
        import customlayers
        print(customlayers.backend())
    """)
    assert "fallback" in out.splitlines()
    assert "CUDA kernels were built with CUDA" in out and "torch uses CUDA 9.9" in out


@requires_extension()
def test_missing_device_kernel_falls_back_with_one_warning(monkeypatch):
    """A device without a compiled kernel runs the reference inside the dispatcher (the raw op too), warns
    once, gives the same values and gradients, and the report says so; afterwards the kernel serves again."""
    x = torch.randn(33, 17, dtype=torch.float64, requires_grad=True)
    kernel_y = customlayers.functional.centered(x, 1)
    monkeypatch.setattr(customlayers._ops, "_warned", set())
    with customlayers._ops.reference_kernels(["cpu"], "a test"):
        with pytest.warns(RuntimeWarning, match=r"no compiled cpu kernel for centered \(a test\)"):
            fallback_y = torch.ops.customlayers.centered(x, [1])
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            customlayers.functional.centered(x, 1)  # no second warning
        report = customlayers.backend_report()
        assert report["ops"]["centered"] == {"cpu": "fallback", "cuda": "kernel"}
        assert report["why"]["centered"] == {"cpu": "a test"}
        g = torch.randn_like(x)
        fallback_grad, = torch.autograd.grad(fallback_y, x, g)
    torch.testing.assert_close(fallback_y, kernel_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(fallback_grad, torch.autograd.grad(kernel_y, x, g)[0], rtol=0, atol=1e-12)
    assert customlayers.backend_report()["ops"]["centered"]["cpu"] == "kernel"


@requires_extension()
def test_python_schemas_match_the_library():
    """The schemas Python reads from customlayers/schemas.def (to define the ops without the library) are
    the ones csrc/ops.cpp defined from it."""
    for name, schema in customlayers._ops.SCHEMAS.items():
        assert customlayers._ops.op(name)._schema == torch._C.parse_schema(f"customlayers::{schema}")


def test_force_fallback_one_device_and_transforms():
    """CUSTOMLAYERS_FORCE_FALLBACK=cpu keeps the library for other devices; =1 drops it: the ops are then
    the references, and torch.func, vmap and compile take them as they are."""
    out = run_python("""
        import torch, customlayers
        from torch.func import grad, vmap
        r = customlayers.backend_report()
        print(r["backend"], r["ops"]["linear_act"]["cpu"])
        x, w = torch.randn(4, 3), torch.randn(3, 2)
        g = grad(lambda x: customlayers.functional.linear_act(x, w).sum())(x)
        torch.testing.assert_close(g, (x @ w > 0).float() @ w.t())
        v = vmap(customlayers.functional.centered)(x)
        torch.testing.assert_close(v, x - x.mean(1, keepdim=True))
        c = torch.compile(customlayers.nn.CenteredLayer(), fullgraph=True)(x)
        torch.testing.assert_close(c, x - x.mean())
        print("ok")
    """, CUSTOMLAYERS_FORCE_FALLBACK="1")
    assert "fallback fallback" in out and "ok" in out
    if customlayers._ops.loaded():
        out = run_python("""
            import torch, customlayers
            r = customlayers.backend_report()
            print(r["backend"], r["ops"]["linear_act"])
            y = customlayers.nn.LinearReLU(3, 2)(torch.randn(4, 3, requires_grad=True))
            y.sum().backward()
        """, CUSTOMLAYERS_FORCE_FALLBACK="cpu")
        assert "extension {'cpu': 'fallback', 'cuda': 'kernel'}" in out
        assert "no compiled cpu kernel for linear_act_backward" in out


def test_fallback_autocast_like_the_kernels():
    """Without the library, linear_act under autocast still runs in the autocast dtype (bias included)."""
    out = run_python("""
        import torch, customlayers
        lin = customlayers.nn.LinearReLU(4, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            print(customlayers.backend(), lin(torch.randn(2, 4)).dtype, torch.nn.Linear(4, 3)(torch.randn(2, 4)).dtype)
    """, CUSTOMLAYERS_FORCE_FALLBACK="1")
    assert "fallback torch.bfloat16 torch.bfloat16" in out


def test_backend_report_lists_every_op():
    report = customlayers.backend_report()
    assert set(report["ops"]) == set(customlayers._ops.OPS)


def test_aten_cpu_capability_does_not_change_what_torch_says_the_cpu_runs():
    """ATEN_CPU_CAPABILITY lowers the kernels torch (and customlayers) choose, not what CPUID reports."""
    out = run_python("""
        import torch
        print(torch.backends.cpu.get_cpu_capability(), torch.cpu._is_avx2_supported())
    """, ATEN_CPU_CAPABILITY="default")
    capability, avx2 = out.split()[:2]
    assert capability == "DEFAULT"
    assert avx2 == str(torch.cpu._is_avx2_supported())


@requires_extension()
def test_a_build_from_before_the_cpu_tiers_is_refused():
    """A build record without CPU_TIERS is of a library whose CPU kernels sit in the core, compiled for the
    build machine's CPU: it is not loaded (it could die of SIGILL here), and the fallback says why."""
    out = run_python("""
        import runpy, sys, types
        real = runpy.run_path("customlayers/_build_info.py")  # the record alone, the package not imported
        old = types.ModuleType("customlayers._build_info")
        old.__dict__.update({k: v for k, v in real.items() if k.isupper() and k != "CPU_TIERS"})
        sys.modules["customlayers._build_info"] = old
        import customlayers
        print(customlayers.backend())
    """)
    assert "fallback" in out.splitlines()
    assert "built before the CPU kernels came in run-time tiers" in out


@requires_extension()
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 vector registers")
def test_only_the_tiers_libraries_use_wider_vectors():
    """The core (_C: schemas, autograd, the CUDA plumbing) and the default tier use no AVX register (they
    load and run on any x86-64 CPU), the avx2 tier no AVX-512 register; only the avx512 tier uses zmm."""
    import glob
    import shutil
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    folder = os.path.dirname(customlayers.__file__)

    def registers(path):
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                              check=True).stdout
        return {"ymm": "%ymm" in text, "zmm": "%zmm" in text}

    (core,) = glob.glob(os.path.join(folder, "_C*.so"))
    assert registers(core) == {"ymm": False, "zmm": False}
    built = customlayers._build_info.CPU_TIERS
    allowed = {"default": set(), "avx2": {"ymm"}, "avx512": {"ymm", "zmm"}}
    for tier in built:
        used = {r for r, present in registers(os.path.join(folder, _cpu.tier_library(tier))).items() if present}
        assert used <= allowed[tier], (tier, used)
    if "avx512" in built:
        assert registers(os.path.join(folder, _cpu.tier_library("avx512")))["zmm"]


@pytest.mark.slow
def test_import_under_qemu_without_avx2_runs_the_default_tier():
    """Under qemu-user emulating a CPU without AVX2 (Nehalem), the core loads the default tier and its
    kernels run, exit 0 (/proc/cpuinfo still shows the host's flags there). Slow: about a minute."""
    import shutil
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user)")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("not an x86-64 machine")
    env = {k: v for k, v in os.environ.items() if k not in ("CUSTOMLAYERS_FORCE_FALLBACK", "ATEN_CPU_CAPABILITY")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    code = ("import customlayers, torch; print(customlayers.backend(), customlayers.backend_report()['build'].get('cpu_tier'), "
            "customlayers.functional.centered(torch.tensor([1.0, 3.0])).tolist())")
    out = subprocess.run([qemu, "-cpu", "Nehalem", sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    expected = "extension default" if customlayers._ops.loaded() else "fallback None"
    assert out.stdout.startswith(expected + " [-1.0, 1.0]"), out.stdout


def test_compile_before_any_eager_call():
    """The kernel-or-fallback choice is made at import: a fresh process can start with torch.compile."""
    out = run_python("""
        import torch, customlayers
        f = torch.compile(lambda x: customlayers.functional.centered(x), fullgraph=True)
        print(f(torch.arange(5.0)).tolist())
    """)
    assert "[-2.0, -1.0, 0.0, 1.0, 2.0]" in out


def test_sdist_has_every_source(tmp_path):
    """A source distribution builds: it carries every file setup.py and CMake compile, headers included.
    Building it leaves the checkout's build record alone (it describes the library built beside it)."""
    import tarfile
    record = os.path.join(ROOT, "customlayers", "_build_info.py")
    before = open(record).read() if os.path.exists(record) else None
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "CUSTOMLAYERS_CPU_ONLY": "1"})
    assert out.returncode == 0, out.stderr
    assert (open(record).read() if os.path.exists(record) else None) == before, "sdist rewrote the build record"
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
              for f in files} | {"CMakeLists.txt", "setup.py", "pyproject.toml", "LICENSE", "CHANGELOG.md",
                                 "customlayers/_build_check.py", "customlayers/_cpu.py",
                                 "customlayers/cpu_tiers.txt", "customlayers/schemas.def"} \
        | {os.path.join("cmake", f) for f in os.listdir(os.path.join(ROOT, "cmake"))}
    assert not wanted - packed, f"missing from the sdist: {sorted(wanted - packed)}"


AARCH64_GXX = "aarch64-linux-gnu-g++"


def test_aarch64_build_passes_no_x86_flags(monkeypatch):
    cpu = load_file("_customlayers_cpu_test", "customlayers", "_cpu.py")
    monkeypatch.delenv("CUSTOMLAYERS_CPU_TIERS", raising=False)
    assert cpu.build_tiers("aarch64") == ("default",) and cpu.TIER_FLAGS["default"] == ()
    assert cpu.build_tiers("x86_64") == cpu.TIERS
    monkeypatch.setenv("CUSTOMLAYERS_CPU_TIERS", "default, avx512")
    assert cpu.build_tiers("x86_64") == ("default", "avx512")
    for bad in ("avx2", "default,sse9"):
        monkeypatch.setenv("CUSTOMLAYERS_CPU_TIERS", bad)
        with pytest.raises(RuntimeError, match=f"CUSTOMLAYERS_CPU_TIERS must list 'default' and any of avx2, avx512, got '{bad}'"):
            cpu.build_tiers("x86_64")


@pytest.mark.skipif(not __import__("shutil").which(AARCH64_GXX),
                    reason=f"{AARCH64_GXX} is not installed (make cross-gxx installs Debian's g++-aarch64-linux-gnu)")
def test_cpu_sources_cross_compile_for_aarch64(tmp_path):
    """Every C++ source setup.py builds (the core's and the CPU tier's) compiles for aarch64 with the flags a
    build there would use (the 'default' tier: no x86 flag), against this torch's headers; each object is
    an aarch64 ELF file."""
    from concurrent.futures import ThreadPoolExecutor
    from torch.utils import cpp_extension

    cpu = load_file("_customlayers_cpu_test", "customlayers", "_cpu.py")
    flags = ["-std=c++20", "-O1", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-DCUSTOMLAYERS_BUILDING_LIBRARY",
             *(f for tier in cpu.build_tiers("aarch64") for f in cpu.TIER_FLAGS[tier]), f"-I{os.path.join(ROOT, 'csrc')}",
             f"-I{os.path.join(ROOT, 'csrc', 'include')}", *(f"-I{d}" for d in cpp_extension.include_paths())]
    sources = sorted(set(cpu.core_sources(ROOT)) | set(cpu.tier_sources(ROOT)))
    assert any(s.endswith(os.path.join("cpu", "linear_act_small.cpp")) for s in sources)

    def compile_one(src):
        obj = tmp_path / (os.path.relpath(src, ROOT).replace(os.sep, "_") + ".o")
        out = subprocess.run([AARCH64_GXX, *flags, "-c", src, "-o", str(obj)], capture_output=True, text=True)
        return src, out, obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for src, out, obj in pool.map(compile_one, sources):
            assert out.returncode == 0, f"{src}:\n{out.stderr[-4000:]}"
            header = obj.read_bytes()[:20]
            assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183, src  # EM_AARCH64
