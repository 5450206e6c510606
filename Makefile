# make demo   create .venv, install torch + build deps, build the extension, run the demo and a quick benchmark
# make test   the same setup, then the full test suite
# make bench  full benchmarks (results under benchmarks/results/<device>/)
# make clean  remove build outputs (keeps .venv)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := ninja numpy scipy pytest matplotlib setuptools wheel
DEPS_STAMP := $(VENV)/.customlayers-deps
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=
# The extension is built in place: run everything against this checkout.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: demo test bench build clean

$(DEPS_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(DEPS)
	touch $@

build: $(DEPS_STAMP)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py --quiet build_ext --inplace

demo: build
	$(PY) examples/demo.py
	$(PY) -m benchmarks.run --quick

# pytest exits 5 when it collected no test: that is a failure too.
test: build
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: build
	$(PY) -m benchmarks.run

clean:
	rm -rf build dist *.egg-info customlayers/_C*.so customlayers/_build_info.py
	find . -name __pycache__ -prune -exec rm -rf {} +
