# Every target builds its own virtualenv (.venv) first: a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch: PyPI's default wheel (CUDA 13, the nvcc here), the newest pip offers on
# these machines; triton: the version that torch pins.
DEPS := torch==2.14.1 triton==3.8.0 pytest pytest-benchmark hypothesis numpy ninja \
        setuptools wheel tqdm matplotlib pot diffusers flow_matching torchsde \
        scikit-learn
# k-diffusion's declared dependencies would replace torch: its sampling module
# needs only torch, torchsde and scipy, so it is installed without them.
NODEPS := k-diffusion
STAMP := $(VENV)/.flowkern-deps
BUILT := $(VENV)/.flowkern-built
SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc') \
           flowkern/ops/schemas.inc setup.py

.PHONY: demo test test-full bench gpu-check build wheel clean aot test-cpu-torch test-compat

# The main job: train a small flow on built-in 2-D data with the fused ops,
# sample it with every fused sampler, print quality vs NFE, write plots.
demo: $(BUILT)
	$(PY) -m flowkern demo --out flowkern-demo

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

$(BUILT): $(STAMP) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m pytest tests -q

test-full: $(BUILT)
	$(PY) -m pytest tests -q --full

aot: $(BUILT)
	$(PY) -m flowkern.triton.aot

# torchcfm's declared dependencies would replace torch; it imports with what
# DEPS already brings (pot, scipy), so it comes without them.
bench: $(BUILT)
	-$(PY) -m pip install -q --no-deps torchcfm
	mkdir -p bench/results
	$(PY) -m pytest bench -o python_files='bench_*.py' -q \
	    --benchmark-json=bench/results/all.json
	@# the per-round samples (25 MB) are dropped: the report reads the statistics
	$(PY) -c "import json; p = 'bench/results/all.json'; d = json.load(open(p)); \
	    [b['stats'].pop('data', None) for b in d['benchmarks']]; json.dump(d, open(p, 'w'), indent=4)"
	$(PY) bench/report.py bench/results/all.json BENCHMARKS.md

# On a machine with a CUDA GPU: the suite on the real cuda and triton kernels
# (no interpreter; the wheel test is left to CI), then the device bandwidth
# benchmark of every fused op, the sync and CUDA-graph check, and the host time
# per call of each GPU backend, with a summary. On a GPU machine without
# network (no .venv), tools/gpu_check_bare.sh does the same with its python3.
gpu-check: $(BUILT)
	FLOWKERN_TEST_DEVICE=cuda $(PY) -m pytest tests -q --durations=10 \
	    -k "not test_build" 2>&1 | tee gpu-check.log
	$(PY) bench/device_bench.py --device cuda 2>&1 | tee -a gpu-check.log
	$(PY) bench/gpu_sync_check.py 2>&1 | tee -a gpu-check.log
	$(PY) bench/gpu_overhead.py --backend cuda 2>&1 | tee -a gpu-check.log
	$(PY) bench/gpu_overhead.py --backend triton 2>&1 | tee -a gpu-check.log
	@echo "=== gpu-check summary ==="; grep -E "passed|failed|error" gpu-check.log | tail -3; \
	    grep -A40 "^device cuda" gpu-check.log

# Builds a wheel from a copy of the working tree against a CPU-only torch
# (torch==2.13.0+cpu in its own .venv-cputorch) and smoke-tests the installed
# wheel from outside the repository (tests_compat/). Leaves .venv and the
# in-place build alone.
test-cpu-torch:
	bash tools/check_cpu_torch.sh

# One wheel across torch versions: the cp310-abi3 wheel built once against
# .venv's torch (CUDA 13, nvcc), installed into a fresh venv per torch version
# (tools/check_compat.sh: 2.10.0, 2.13.0+cpu, 2.14.1, 2.15.0) with a smoke suite
# in each; prints the matrix README.md states.
test-compat: $(BUILT)
	bash tools/check_compat.sh

wheel: $(STAMP)
	$(PY) -m pip wheel . --no-deps --no-build-isolation -w dist

clean:
	rm -rf build dist *.egg-info flowkern/*.so $(BUILT)
