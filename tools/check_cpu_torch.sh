#!/usr/bin/env bash
# Does flowkern build and work against a CPU-only torch (the CPU kernels only)?
#
#   1. a virtualenv .venv-cputorch with torch==2.13.0+cpu and the build deps
#      (reused while its stamp file records the same dependency list);
#   2. a wheel built from a copy of the working tree (uncommitted changes
#      included; .venv*, build/, *.so and everything else git ignores left out)
#      in a temporary directory: the in-place build of the main .venv
#      (flowkern/*.so) is never touched. FLOWKERN_SKIP_CUDA is unset: setup.py
#      must itself notice that this torch has no CUDA;
#   3. the wheel installed into the venv, and tests_compat/test_smoke.py run
#      from a directory outside the repository, so that `import flowkern` is
#      the installed wheel.
#
# Usage: tools/check_cpu_torch.sh        (make test-cpu-torch)
# Environment: PYTHON (interpreter for the venv, default python3),
#   CPU_TORCH (default torch==2.13.0+cpu), CPU_TORCH_DEPS (the build/test deps),
#   CPU_TORCH_VENV (default .venv-cputorch), KEEP_TMP=1 (keep the temp dir),
#   MAX_JOBS (parallel compile jobs; default: the number of cores),
#   CHECK_CPU_TORCH_SKIP_CUDA=1 (diagnostic: build with FLOWKERN_SKIP_CUDA=1, to
#   test the CPU kernels while the CUDA sources do not compile; the PASS line
#   says so; the check proper leaves FLOWKERN_SKIP_CUDA unset).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${CPU_TORCH_VENV:-$ROOT/.venv-cputorch}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
VPY="$VENV/bin/python"
TORCH_SPEC="${CPU_TORCH:-torch==2.13.0+cpu}"
# What setup.py needs with --no-build-isolation, and the test runner. pybind11
# is added below only while setup.py still imports it.
DEPS="${CPU_TORCH_DEPS:-setuptools wheel ninja pytest numpy}"
if grep -Eq '^[[:space:]]*(import|from)[[:space:]]+pybind11' setup.py; then
    DEPS="$DEPS pybind11"
fi
STAMP="$VENV/.flowkern-cputorch-deps"
WANT_STAMP="$TORCH_SPEC $DEPS"
LOG_DIR="$VENV/logs"
START=$(date +%s)

result() {  # result PASS|FAIL message
    local secs=$(( $(date +%s) - START ))
    echo "=== test-cpu-torch: $1 — $2 (torch ${TORCH_VERSION:-?}, ${secs}s) ==="
}
fail() {
    result FAIL "$*"
    exit 1
}

# -- 1. the venv -------------------------------------------------------------
if [[ -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]]; then
    echo "--- reusing $VENV ($WANT_STAMP)"
else
    echo "--- creating $VENV: $WANT_STAMP"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || fail "could not create $VENV"
    # word splitting of $DEPS is intended: it is a list of requirements
    # shellcheck disable=SC2086
    # (pipefail: pip's own status; the filter drops this machine's index warnings)
    if ! "$VPY" -m pip install -q "$TORCH_SPEC" $DEPS 2>&1 \
            | { grep -v 'is ignored: it is neither' || true; }; then
        fail "pip could not install $WANT_STAMP"
    fi
    echo "$WANT_STAMP" > "$STAMP"
fi
mkdir -p "$LOG_DIR"
TORCH_VERSION="$("$VPY" -c 'import torch; print(torch.__version__)')" \
    || fail "torch does not import in $VENV"
TORCH_CUDA="$("$VPY" -c 'import torch; print(torch.version.cuda)')"
echo "--- torch $TORCH_VERSION (torch.version.cuda = $TORCH_CUDA), $("$VPY" -V)"
[[ "$TORCH_CUDA" == "None" ]] || fail "torch $TORCH_VERSION in $VENV is not a CPU-only build"

# -- 2. a wheel from a copy of the working tree --------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/flowkern-cputorch.XXXXXX")"
cleanup() {
    if [[ "${KEEP_TMP:-0}" == "1" ]]; then echo "--- kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
SRC="$TMP/src"; DIST="$TMP/dist"; RUN="$TMP/run"
mkdir -p "$SRC" "$DIST" "$RUN"

echo "--- copying the working tree to $SRC"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # tracked and untracked files that git does not ignore, as they are on disk
    # now; a tracked file deleted in the working tree is skipped.
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
        | (cd "$ROOT" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
        | tar -xf - -C "$SRC"
else
    tar -C "$ROOT" --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='*.so' \
        --exclude='*.o' --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' \
        -cf - . | tar -xf - -C "$SRC"
fi
[[ -f "$SRC/setup.py" ]] || fail "the copy of the working tree has no setup.py"
[[ -z "$(find "$SRC" -name '*.so' -print -quit)" ]] || fail "a .so file was copied into $SRC"

BUILD_LOG="$LOG_DIR/build.log"
echo "--- building the wheel (pip wheel --no-deps --no-build-isolation; log: $BUILD_LOG)"
SO_BEFORE="$(cd "$ROOT" && ls -l --time-style=+%s.%N flowkern/*.so 2>/dev/null || true)"
set +e
SKIP_ENV=(-u FLOWKERN_SKIP_CUDA)
if [[ "${CHECK_CPU_TORCH_SKIP_CUDA:-0}" == "1" ]]; then
    # diagnostic only: setup.py's own CUDA detection is then not what is tested
    echo "--- NOTE: CHECK_CPU_TORCH_SKIP_CUDA=1: building with FLOWKERN_SKIP_CUDA=1"
    SKIP_ENV=(FLOWKERN_SKIP_CUDA=1)
fi
(cd "$SRC" && env -u PYTHONPATH "${SKIP_ENV[@]}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$VPY" -m pip wheel . -v --no-deps --no-build-isolation -w "$DIST") >"$BUILD_LOG" 2>&1
BUILD_RC=$?
set -e
# What setup.py decided about the CUDA module, and what it compiled and linked.
echo "--- what setup.py did (each compile and link, its messages, the errors):"
"$VPY" - "$BUILD_LOG" "$SRC/" <<'PYEOF' || true
import re, sys
log, src = open(sys.argv[1], errors="replace").read().splitlines(), sys.argv[2]
seen, shown = set(), 0
for line in log:
    s = line.strip().replace(src, "")
    out = None
    if s.startswith("flowkern:") or re.match(r"building '[^']+' extension", s):
        out = s
    elif m := re.match(r"(?:\[\d+/\d+\] )?(?:\S*/)?(c\+\+|g\+\+|gcc|nvcc)\s(?:.*\s)?-c\s+(\S+)", s):
        out = f"{m[1]:5} {m[2]}"
    elif m := re.match(r"(?:\S*/)?(?:c\+\+|g\+\+)\s.*-shared\s.*-o\s+(\S+)", s):
        out = f"link  {m[1]}"
    elif (re.search(r"(\berror\b|undefined reference|No such file)", s, re.I)
          or re.match(r"\w+(Error|Exception)\b", s)) and "subprocess" not in s:
        out = s
    if out and out not in seen and shown < 60:
        seen.add(out); shown += 1
        print("    " + (out if len(out) <= 200 else out[:200] + " ..."))
PYEOF
# The build ran in $SRC: nothing of it may name the repository's build outputs.
if grep -Fq -e "$ROOT/flowkern/" -e "$ROOT/build/" "$BUILD_LOG"; then
    fail "the build referred to the repository's flowkern/ or build/ (see $BUILD_LOG)"
fi
SO_AFTER="$(cd "$ROOT" && ls -l --time-style=+%s.%N flowkern/*.so 2>/dev/null || true)"
if [[ "$SO_BEFORE" != "$SO_AFTER" ]]; then
    # not this build (it wrote only under $TMP): another process rebuilt the main .venv's in-place build
    echo "--- note: the repository's flowkern/*.so changed meanwhile (not by this build, which wrote only under $TMP)"
fi
if [[ $BUILD_RC -ne 0 ]]; then
    echo "--- build failed (rc $BUILD_RC); the compiler / linker diagnostics (all of it: $BUILD_LOG):"
    { grep -E -A4 '(: (fatal )?error|undefined reference|ld: |collect2)' "$BUILD_LOG" | head -80
      grep -E '^\s*[A-Za-z_.]*(Error|Exception)\b' "$BUILD_LOG" | tail -3; } || tail -40 "$BUILD_LOG"
    fail "the wheel did not build against torch $TORCH_VERSION"
fi
WHEEL="$(ls "$DIST"/flowkern-*.whl)"
echo "--- built $(basename "$WHEEL"):"
"$VPY" -c 'import sys, zipfile
for n in sorted(zipfile.ZipFile(sys.argv[1]).namelist()):
    if n.endswith(".so"): print("      ", n)' "$WHEEL"

# -- 3. install, smoke test from outside the repository ------------------------
"$VPY" -m pip install -q --no-deps --force-reinstall "$WHEEL" || fail "pip could not install the wheel"

cp "$ROOT/tests_compat/test_smoke.py" "$RUN/"
: > "$RUN/pytest.ini"   # rootdir here: neither the repo's pyproject.toml nor its conftest.py
cd "$RUN"
export FLOWKERN_COMPAT_REPO="$ROOT" FLOWKERN_COMPAT_EXPECT_CPU=1
unset PYTHONPATH FLOWKERN_BACKEND FLOWKERN_DEBUG TRITON_INTERPRET
FK_FILE="$("$VPY" -c 'import flowkern; print(flowkern.__file__)')" || fail "import flowkern failed"
echo "--- flowkern.__file__ = $FK_FILE; available: $("$VPY" -c 'import flowkern; print(flowkern.available())')"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
case "$(realpath "$FK_FILE")" in
    "$(realpath "$SITE")"/*) ;;
    *) fail "flowkern was imported from $FK_FILE, not from the wheel installed in $SITE" ;;
esac

TEST_LOG="$LOG_DIR/pytest.log"
set +e
"$VPY" -m pytest -q -p no:cacheprovider -ra test_smoke.py 2>&1 | tee "$TEST_LOG"
TEST_RC=${PIPESTATUS[0]}
set -e
SUMMARY="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$TEST_LOG" | tail -1 | tr -d '=' | xargs)"
if [[ $TEST_RC -ne 0 ]]; then
    fail "smoke test: ${SUMMARY:-pytest exit $TEST_RC}"
fi
NOTE=""
[[ "${CHECK_CPU_TORCH_SKIP_CUDA:-0}" == "1" ]] && NOTE=" [built with FLOWKERN_SKIP_CUDA=1: diagnostic run]"
result PASS "smoke test: $SUMMARY$NOTE"
