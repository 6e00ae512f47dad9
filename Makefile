# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Set-up is idempotent: the venv and the pinned packages are installed once (re-done when
# requirements.txt changes), and the extension build is incremental (ninja).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
# torch.utils.cpp_extension guesses CUDA_HOME from the nvcc on PATH; setup.py finds the real
# toolkit, this only silences the guess.
export CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda) /usr/local)

.PHONY: setup build test demo bench bench-heap static-report gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(DEPS)

setup: $(DEPS)

build: setup
	$(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest tests -q

demo: build
	$(PY) -m coordgate_ext.experiments

bench: build
	$(PY) -m pytest benchmarks -q

# The same benchmarks with glibc serving every allocation from its reused heap (no fresh
# mmap'd pages to fault in on each call), as jemalloc or tcmalloc would: what is left is the
# kernels' own cost. Writes results/benchmarks-heap.{json,png}.
HEAP_MALLOC := glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
bench-heap: build
	GLIBC_TUNABLES=$(HEAP_MALLOC) COORDGATE_BENCH_TAG=heap $(PY) -m pytest benchmarks -q

# The static GPU tables of the Triton kernels (registers, shared memory, spills, MMA
# instructions) and of the CUDA C++ kernels (registers, shared and local memory).
static-report: build
	$(PY) scripts/triton_static_report.py > docs/triton_static_report.md
	$(PY) scripts/cuda_static_report.py > docs/cuda_static_report.md

# On a machine with one CUDA GPU (docs/gpu_check.md): builds in place for that GPU against
# $(PYTHON), which must already have a CUDA build of torch (no venv, nothing downloaded), then
# tests, sanitizes and times every backend. Writes results/gpu/.
gpu-check:
	$(PYTHON) scripts/gpu_check.py

clean:
	rm -rf build dist coordgate_ext/*.so coordgate_ext/_build_info.json
