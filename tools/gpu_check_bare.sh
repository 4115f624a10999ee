#!/bin/bash
# `make gpu-check` on a GPU machine that has torch but no network (no .venv can
# be made there): builds flowkern in place against that machine's python3 and
# torch, then runs, each under its own time limit and log in $OUT (default
# ./gpu-check-out):
#   tests.log     the suite on the real cuda and triton kernels (pytest-xdist)
#   sync.log      bench/gpu_sync_check.py: no host sync, CUDA-graph capture
#   memcheck.log  compute-sanitizer memcheck over every public op on odd shapes
#   device.log    bench/device_bench.py: bandwidth of every fused op
#   overhead.log  bench/gpu_overhead.py: host time per call, per backend
#   stages.txt    the machine (env) and each stage's exit status and seconds
# Wheels of missing pure-Python peers (k-diffusion, diffusers, ...) in .whl/
# are installed into /tmp/site first.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME's
    # part before the first '-' .log (the overhead-* stages share one file)
    local name=$1 secs=$2; shift 2
    local t0=$(date +%s)
    echo "=== $name: $*" >> "$OUT/${name%%-*}.log"
    timeout -k 5 "$secs" "$@" >> "$OUT/${name%%-*}.log" 2>&1
    local rc=$?
    echo "stage $name rc=$rc $(( $(date +%s) - t0 ))s" >> "$OUT/stages.txt"
    return $rc
}
{ nvidia-smi; $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, torch.version.cuda, 'triton', triton.__version__)"; nvcc --version | tail -2; nproc; } > "$OUT/stages.txt" 2>&1
if ! stage build ${BUILD_S:-150} env MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace; then
    # a prebuilt flowkern._C (the wheel's, made elsewhere) when one was brought
    # along in .gpu/: the stable-ABI module loads into this torch, the
    # torch-bound _nograd/_fastcall are then not used
    [ -f .gpu/_C.abi3.so ] || exit 1
    echo "build failed: using the prebuilt .gpu/_C.abi3.so" >> "$OUT/stages.txt"
    rm -f flowkern/_C*.so flowkern/_nograd*.so flowkern/_fastcall*.so
    cp .gpu/_C.abi3.so flowkern/
fi
$PY -c "import flowkern, flowkern.backend as b; print(flowkern.available(), 'fastcall', b.fastcall() is not None, 'nograd', b.nograd_native())" >> "$OUT/stages.txt" 2>&1
# correctness: the suite and the sync/graph check side by side (the GPU has room);
# the modules that test only CPU-side things (the build, AOT compiles, the grid
# simulator, layering, CPU streaming) are left out
XDIST=""
$PY -c "import xdist, pytest_timeout" 2>/dev/null && XDIST="-n ${WORKERS:-12} --timeout 120"
stage sync ${SYNC_S:-170} $PY bench/gpu_sync_check.py &
FLOWKERN_TEST_DEVICE=cuda stage tests ${TESTS_S:-180} $PY -m pytest tests -q -rfE --tb=short \
    -p no:cacheprovider $XDIST --durations=15 \
    --ignore=tests/test_build.py --ignore=tests/test_aot.py --ignore=tests/test_cuda_build.py \
    --ignore=tests/test_cuda_sim.py --ignore=tests/test_cuda_sim_fields.py \
    --ignore=tests/test_cuda_sim_flowmap.py --ignore=tests/test_cuda_sim_steps.py \
    --ignore=tests/test_layering.py --ignore=tests/test_cpu_streaming.py \
    --ignore=tests/test_demo.py ${TESTS_ARGS:-}
wait
# timings, alone on the machine (memcheck, its own process, before the last two)
stage device ${DEVICE_S:-40} $PY bench/device_bench.py --device cuda
stage overhead-cuda 40 $PY bench/gpu_overhead.py --backend cuda --profile "euler_step (table)"
# out-of-bounds accesses of every public op's CUDA kernels on odd shapes
command -v compute-sanitizer >/dev/null && stage memcheck ${MEMCHECK_S:-70} \
    compute-sanitizer --tool memcheck --error-exitcode 9 $PY bench/gpu_overhead.py \
    --backend cuda --n 1 --reps 1 --shape 7x131
stage overhead-triton 60 $PY bench/gpu_overhead.py --backend triton --profile "euler_step (table)"
FLOWKERN_TRITON_OP=1 stage overhead-triton_op 50 $PY bench/gpu_overhead.py --backend triton \
    --profile "euler_step (table)"
cat "$OUT/stages.txt"
