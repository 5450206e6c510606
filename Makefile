# make demo   create .venv, install torch + build deps (+ the demo's: scikit-learn, tqdm), build the extension,
#             run the tour (examples/demo.py), the training demo (examples/train_digits.py) and a quick benchmark
# make test   the same setup (demo extras included), then the full test suite: pytest, the C++ tests (cpp-test),
#             then the CPU kernel tests again under each lower CPU tier this machine runs (test-tiers)
# make test-long  the full suite with the slow tests too (tests marked slow: tensors beyond 2^31 elements)
# make cpp-test  configure + build the CMake library, C++ tests and example in build/cmake, run ctest
# make sanitize  the CMake library and its GoogleTest suite under AddressSanitizer + UBSan (build/sanitize)
# make bench  full benchmarks (results under benchmarks/results/<device>/)
# make clean  remove build outputs (keeps .venv)
# make device-build  the extension for the GPU machine's torch (DEVICE_TORCH, Python DEVICE_PYTHON) in
#             build/device/customlayers/, which benchmarks/gpu_check.sh loads (carry build/device)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := ninja numpy scipy pytest hypothesis matplotlib setuptools wheel
# The optional extra 'onnx' (pyproject.toml), which tests/test_onnx.py needs.
DEPS += onnx onnxscript onnxruntime
# The optional extra 'quantization' (pyproject.toml), which tests/test_quantization.py's torchao tests need.
DEPS += torchao==0.18.0
DEPS_STAMP := $(VENV)/.customlayers-deps
# The training demo's extras (pyproject.toml's [demo]; matplotlib is in DEPS already)
DEMO_DEPS := scikit-learn tqdm
DEMO_STAMP := $(VENV)/.customlayers-demo-deps
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=
PYTEST_ENV ?=
# The CMake build (libtorch users): CPU kernels only by default here, since setup.py already compiles the
# CUDA kernels; CMAKE_WITH_CUDA=AUTO|ON builds them with CMake too.
CMAKE_BUILD_DIR ?= build/cmake
CMAKE_WITH_CUDA ?= OFF
CMAKE_ARGS ?=
CMAKE_LIBRARY := $(abspath $(CMAKE_BUILD_DIR))/libcustomlayers.so
CPP_ENV := PATH="$(abspath $(VENV))/bin:$$PATH"
# The extension is built in place: run everything against this checkout.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

# The GPU machine's torch and Python (benchmarks/gpu_check.sh runs there): the extension is compiled for
# sm_90 against that torch, in its own venv, with portable CPU kernels, and checked to load under it here.
DEVICE_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
DEVICE_TORCH ?= torch==2.11.0
DEVICE_VENV ?= .venv-device
DEVICE_ARCH ?= 9.0
DEVICE_OUT := build/device

.PHONY: demo test test-tiers test-long bench build clean cpp-build cpp-test gtest cross-gxx device-build sanitize

$(DEPS_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(DEPS)
	touch $@

build: $(DEPS_STAMP)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py --quiet build_ext --inplace

$(DEMO_STAMP): $(DEPS_STAMP)
	$(PY) -m pip install --quiet $(DEMO_DEPS)
	touch $@

demo: build $(DEMO_STAMP)
	$(PY) examples/demo.py
	$(PY) examples/train_digits.py
	$(PY) -m benchmarks.run --quick

# pytest exits 5 when it collected no test: that is a failure too. The CMake library is built first:
# pytest loads it into Python (tests/test_cpp_library.py), CUSTOMLAYERS_CMAKE_LIBRARY makes it required.
test: build cpp-build cross-gxx $(DEMO_STAMP)
	$(PYTEST_ENV) CUSTOMLAYERS_CMAKE_LIBRARY=$(CMAKE_LIBRARY) $(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
	$(CPP_ENV) ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure
	$(MAKE) test-tiers

# The CPU kernel tests again under each CPU tier below the one this machine loads (the full suite ran that
# one), each selected with ATEN_CPU_CAPABILITY as a user would: e.g. default and avx2 on an AVX-512 CPU.
# Each with an Inductor cache of its own: torch 2.14's reuses C++ kernels and headers made under another
# ATEN_CPU_CAPABILITY, which then fail to compile (plain torch.compile does that too).
KERNEL_TESTS := tests/test_linear_act.py tests/test_linear_glu.py tests/test_centered.py tests/test_masked_uniform.py \
  tests/test_properties.py
LOWER_TIERS = $(shell $(PY) -c 'import customlayers as c; b = c.backend_report()["build"]; t = list(b.get("cpu_tiers_built", ())); print(*t[:t.index(b["cpu_tier"])] if b.get("cpu_tier") in t else "")' 2>/dev/null)
test-tiers: build
	@tiers="$(LOWER_TIERS)"; [ -n "$$tiers" ] || echo "test-tiers: no CPU tier below the loaded one here"; \
	for tier in $$tiers; do \
	  echo "== the CPU kernel tests on the $$tier tier (ATEN_CPU_CAPABILITY=$$tier)"; \
	  ATEN_CPU_CAPABILITY=$$tier CUSTOMLAYERS_EXPECT_CPU_TIER=$$tier \
	  TORCHINDUCTOR_CACHE_DIR=$${TMPDIR:-/tmp}/torchinductor_customlayers_$$tier $(PYTEST_ENV) $(PY) -m pytest $(KERNEL_TESTS) $(PYTEST_ARGS) || exit 1; \
	done

# make test with the slow tests and the long hypothesis profile.
test-long:
	$(MAKE) test PYTEST_ENV="CUSTOMLAYERS_RUN_SLOW=1 HYPOTHESIS_PROFILE=long"

# $(call apt_install,CHECK,PACKAGE,WHAT,OTHERWISE): when the shell test CHECK fails, installs the Debian/Ubuntu
# PACKAGE (WHAT names it in the message) if apt-get can, else runs OTHERWISE.
apt_install = if $(1); then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  echo "installing $(3) ($(2))"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(2); \
	else $(4); fi

# GoogleTest for the C++ tests: Debian/Ubuntu's libgtest-dev, installed when missing and apt-get can.
gtest:
	@$(call apt_install,[ -e /usr/include/gtest/gtest.h ] || [ -e /usr/local/include/gtest/gtest.h ],libgtest-dev,GoogleTest,echo "GoogleTest not found: install it (e.g. libgtest-dev) for the C++ tests" >&2; exit 1)

# A C++ cross-compiler for aarch64 (Debian/Ubuntu's g++-aarch64-linux-gnu), installed when missing and apt-get
# can: tests/test_build.py compiles the CPU sources for aarch64 with it.
cross-gxx:
	@$(call apt_install,command -v aarch64-linux-gnu-g++ >/dev/null 2>&1,g++-aarch64-linux-gnu,the aarch64 cross-compiler,echo "aarch64-linux-gnu-g++ not found: the aarch64 cross-compile test will be skipped" >&2)

# The venv's bin first: its python (with torch) for the Torch CMake package, pip's ninja, and pip's
# cmake where the system has none.
cpp-build: $(DEPS_STAMP) gtest
	@$(CPP_ENV) sh -c 'command -v cmake >/dev/null' || $(PY) -m pip install --quiet "cmake>=3.21"
	$(CPP_ENV) cmake -S . -B $(CMAKE_BUILD_DIR) -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCUSTOMLAYERS_WITH_CUDA=$(CMAKE_WITH_CUDA) $(CMAKE_ARGS)
	$(CPP_ENV) cmake --build $(CMAKE_BUILD_DIR) -j $(MAX_JOBS)

cpp-test: cpp-build
	$(CPP_ENV) ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure

# The C++ library (CPU kernels) and its GoogleTest suite built with -fsanitize=address,undefined in their own
# build dir (CMake option CUSTOMLAYERS_SANITIZE), then run: any report fails (-fno-sanitize-recover=all).
# The emulated CUDA tests are left out: they already run under UBSan and TSan in cpp-test. libtorch is not
# instrumented; the test program is linked with -fsanitize, so the ASan runtime is loaded first and
# needs no LD_PRELOAD. LeakSanitizer stays on: it reports nothing from libtorch (checked with torch 2.14.1).
SANITIZE_BUILD_DIR ?= build/sanitize
SANITIZE_ENV := ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: $(DEPS_STAMP) gtest
	@$(CPP_ENV) sh -c 'command -v cmake >/dev/null' || $(PY) -m pip install --quiet "cmake>=3.21"
	$(CPP_ENV) cmake -S . -B $(SANITIZE_BUILD_DIR) -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCUSTOMLAYERS_WITH_CUDA=OFF -DCUSTOMLAYERS_BUILD_EXAMPLES=OFF -DCUSTOMLAYERS_SANITIZE=ON
	$(CPP_ENV) cmake --build $(SANITIZE_BUILD_DIR) --target customlayers_tests -j $(MAX_JOBS)
	$(CPP_ENV) $(SANITIZE_ENV) ctest --test-dir $(SANITIZE_BUILD_DIR) -R '^customlayers_tests$$' --output-on-failure

bench: build
	$(PY) -m benchmarks.run

device-build:
	test -x $(DEVICE_VENV)/bin/python || $(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install --quiet "$(DEVICE_TORCH)" ninja setuptools wheel numpy
	FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(DEVICE_ARCH)" CUSTOMLAYERS_CPU_TIERS=default MAX_JOBS=$(MAX_JOBS) \
	  $(DEVICE_VENV)/bin/python setup.py --quiet build_ext --build-lib $(DEVICE_OUT) --build-temp $(DEVICE_OUT)-temp
	rm -rf $(DEVICE_OUT)-check && mkdir -p $(DEVICE_OUT)-check && cp -r customlayers $(DEVICE_OUT)-check/ \
	  && rm -f $(DEVICE_OUT)-check/customlayers/*.so && cp $(DEVICE_OUT)/customlayers/* $(DEVICE_OUT)-check/customlayers/
	cd $(DEVICE_OUT)-check && PYTHONPATH=. ../../$(DEVICE_VENV)/bin/python -W error::RuntimeWarning -c \
	  'import customlayers as c; r = c.backend_report(); print(r); assert r["backend"] == "extension", r; \
	   assert all(d == {"cpu": "kernel", "cuda": "kernel"} for d in r["ops"].values()), r'
	rm -rf $(DEVICE_OUT)-check
	@ls -l $(DEVICE_OUT)/customlayers/

clean:
	rm -rf build dist *.egg-info customlayers/*.so customlayers/_build_info.py
	find . -name __pycache__ -prune -exec rm -rf {} +
