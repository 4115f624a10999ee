#!/bin/bash
# What tools/gpu_check_bare.sh wants beside the checkout on a GPU machine that
# cannot reach a package index (docs/build.md "On a GPU machine without
# network"), made here, where pip can:
#   .whl/  wheels of the pure-Python peers such a machine lacks (k-diffusion,
#          torchsde, trampoline, diffusers, flow_matching, importlib_metadata),
#          for its CPython (PY_VERSION, default 3.12); --no-deps, one version each
#   .gpu/  the stripped flowkern/_C.abi3.so of `make build` (the fallback when
#          the machine's own build fails), if one is built
# Both folders are git-ignored; name them in the device call's carry list.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY_VERSION="${PY_VERSION:-3.12}"
PEERS="k-diffusion torchsde trampoline diffusers flow_matching importlib_metadata"
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086  (PEERS is a list)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl $PEERS
if [[ -f flowkern/_C.abi3.so ]]; then
    mkdir -p .gpu
    strip -o .gpu/_C.abi3.so flowkern/_C.abi3.so
fi
du -sh .whl .gpu 2>/dev/null || true
echo "carry: [\".whl\", \".gpu\"]; command: OUT=\$OUT bash tools/gpu_check_bare.sh"
