#!/usr/bin/env bash
# One wheel across torch versions (docs/build.md): builds the cp310-abi3 wheel
# ONCE against the main .venv's torch (PyPI's CUDA 13 build, with nvcc: the
# CUDA kernels included), then installs that same file into a fresh venv per
# torch version and runs tests_compat/test_smoke.py there, from outside the
# repository: import, every op on `cpu` against the torch reference, the CUDA
# kernels registered for the CUDA key, the no-derivative ops' rules. In each
# venv tools/compile_check.py also compiles every C++ source against that
# torch's headers (g++ -fsyntax-only): a source install must build there too.
#
#   1. the wheel: `pip wheel` of a copy of the working tree (uncommitted
#      changes included; what git ignores left out), with the main .venv's
#      python and torch, no build isolation; the in-place build is untouched;
#   2. per torch spec: .venv-compat-<version> (reused while its stamp matches),
#      torch + pytest + numpy, the wheel with --no-deps, the smoke suite;
#   3. a summary line per torch, and PASS only if every one passed.
#
# The machine-wide pip constraint (torch<=2.14.1 here: the releases on this
# disk) is replaced by an empty one, so that newer torch comes from PyPI.
#
# Usage: tools/check_compat.sh        (make test-compat)
# Environment: COMPAT_TORCH (the torch specs, default below), PYTHON (for the
#   venvs, default python3), COMPAT_WHEEL (test this wheel instead of building
#   one; its CUDA kernels read from the file list), KEEP_TMP=1, MAX_JOBS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
BUILD_PY="$ROOT/.venv/bin/python"
# the lowest torch the stable ABI target allows (setup.py TORCH_TARGET), a
# CPU-only build, the build's own torch, and the newest on PyPI
COMPAT_TORCH="${COMPAT_TORCH:-torch==2.10.0 torch==2.13.0+cpu torch==2.14.1 torch==2.15.0}"
DEPS="pytest numpy setuptools"
START=$(date +%s)

[[ -x "$BUILD_PY" ]] || { echo "no $BUILD_PY: run make build first"; exit 1; }
TMP="$(mktemp -d "${TMPDIR:-/tmp}/flowkern-compat.XXXXXX")"
cleanup() { if [[ "${KEEP_TMP:-0}" == "1" ]]; then echo "--- kept $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT
: > "$TMP/no-constraints.txt"
export PIP_CONSTRAINT="$TMP/no-constraints.txt"

# -- 1. the wheel, once ----------------------------------------------------------
mkdir -p "$TMP/src" "$TMP/dist" "$TMP/run"
BUILD_TORCH="$("$BUILD_PY" -c 'import torch; print(torch.__version__)')"
if [[ -n "${COMPAT_WHEEL:-}" ]]; then
    cp "$COMPAT_WHEEL" "$TMP/dist/"
    echo "--- testing the given $(basename "$COMPAT_WHEEL")"
else
git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$TMP/src"
echo "--- building the wheel against torch $BUILD_TORCH (log: $TMP/build.log)"
if ! (cd "$TMP/src" && env -u PYTHONPATH -u FLOWKERN_SKIP_CUDA MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$BUILD_PY" -m pip wheel . -v --no-deps --no-build-isolation -w "$TMP/dist") \
        > "$TMP/build.log" 2>&1; then
    grep -E -A4 '(: (fatal )?error|undefined reference)' "$TMP/build.log" | head -60 || tail -40 "$TMP/build.log"
    KEEP_TMP=1
    echo "=== test-compat: FAIL — the wheel did not build ==="
    exit 1
fi
fi
WHEEL="$(ls "$TMP"/dist/flowkern-*.whl)"
"$BUILD_PY" -c 'import sys, zipfile; sys.exit("flowkern/_C.abi3.so" not in zipfile.ZipFile(sys.argv[1]).namelist())' "$WHEEL" \
    || { echo "=== test-compat: FAIL — no flowkern/_C.abi3.so in $WHEEL ==="; exit 1; }
# the CUDA kernels are in the wheel when its _C names the CUDA launchers
CUDA_KERNELS="$("$BUILD_PY" -c 'import sys, zipfile
so = zipfile.ZipFile(sys.argv[1]).read("flowkern/_C.abi3.so")
print(int(b"aoti_torch_get_current_cuda_stream" in so))' "$WHEEL")"
echo "--- built $(basename "$WHEEL") (CUDA kernels: $CUDA_KERNELS)"
cp "$ROOT/tests_compat/test_smoke.py" "$TMP/run/"
: > "$TMP/run/pytest.ini"   # rootdir here: not the repository's conftest.py

# -- 2. one venv per torch ---------------------------------------------------------
declare -a ROWS
FAILED=0
for SPEC in $COMPAT_TORCH; do
    VERSION="${SPEC#torch==}"
    VENV="$ROOT/.venv-compat-$VERSION"
    STAMP="$VENV/.flowkern-compat"
    if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$SPEC $DEPS" ]]; then
        echo "--- reusing $VENV"
    else
        echo "--- creating $VENV ($SPEC $DEPS)"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
        # shellcheck disable=SC2086  (DEPS is a list)
        if ! "$VENV/bin/python" -m pip install -q "$SPEC" $DEPS > "$TMP/pip-$VERSION.log" 2>&1; then
            tail -5 "$TMP/pip-$VERSION.log"
            ROWS+=("| $VERSION | - | - | pip could not install $SPEC | - |"); FAILED=1; continue
        fi
        echo "$SPEC $DEPS" > "$STAMP"
    fi
    VPY="$VENV/bin/python"
    "$VPY" -m pip install -q --no-deps --force-reinstall "$WHEEL" > /dev/null
    CUDA="$("$VPY" -c 'import torch; print(torch.version.cuda)')"
    EXPECT_CPU=0; [[ "$CUDA" == "None" ]] && EXPECT_CPU=1
    LOG="$TMP/pytest-$VERSION.log"
    set +e
    (cd "$TMP/run" && env -u PYTHONPATH -u FLOWKERN_BACKEND -u FLOWKERN_DEBUG -u TRITON_INTERPRET \
        FLOWKERN_COMPAT_REPO="$ROOT" FLOWKERN_COMPAT_EXPECT_CPU="$EXPECT_CPU" \
        FLOWKERN_COMPAT_CUDA_KERNELS="$CUDA_KERNELS" \
        "$VPY" -m pytest -q -s -p no:cacheprovider -ra test_smoke.py) > "$LOG" 2>&1
    RC=$?
    (cd "$ROOT" && env -u PYTHONPATH "$VPY" tools/compile_check.py) > "$TMP/compile-$VERSION.log" 2>&1
    CRC=$?
    set -e
    if [[ $CRC -eq 0 ]]; then SOURCES="yes"; else
        SOURCES="FAIL"; FAILED=1; grep -A8 "^FAIL" "$TMP/compile-$VERSION.log" | head -20; fi
    SUMMARY="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$LOG" | tail -1 | tr -d '=' | xargs)"
    KERNEL="$(grep -o 'Autograd-key kernel of the no-derivative ops: [^ ]*' "$LOG" | head -1 | awk '{print $NF}')"
    if [[ $RC -ne 0 ]]; then
        FAILED=1
        grep -E "^(FAILED|ERROR)" "$LOG" | head -10
        ROWS+=("| $VERSION | $CUDA | ${KERNEL:-?} | FAIL: ${SUMMARY:-pytest exit $RC} | $SOURCES |")
    else
        ROWS+=("| $VERSION | $CUDA | ${KERNEL:-?} | $SUMMARY | $SOURCES |")
    fi
done

# -- 3. the matrix -------------------------------------------------------------------
echo
echo "wheel $(basename "$WHEEL"), built against torch $BUILD_TORCH, $(( $(date +%s) - START ))s:"
echo "| torch | torch.version.cuda | no-derivative kernel | smoke suite | sources compile |"
echo "|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
if [[ $FAILED -ne 0 ]]; then
    echo "=== test-compat: FAIL ==="
    exit 1
fi
echo "=== test-compat: PASS ==="
