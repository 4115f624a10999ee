"""Triton kernels compiled ahead of time for sm_80 and sm_90 without a GPU:
every shipped configuration compiles, and ptxas reports no spills and no
stack frame. Runs in a subprocess: the suite itself runs under
TRITON_INTERPRET=1, which replaces @triton.jit."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _compiling_env():
    """This process's environment without TRITON_INTERPRET (set by conftest)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(*flags):
    proc = subprocess.run([sys.executable, "-m", "flowkern.triton.aot", "--json", *flags],
                          capture_output=True, text=True, env=_compiling_env(), timeout=1200)
    table = [line for line in proc.stdout.splitlines() if not line.startswith("JSON:")]
    print("\n".join(table))  # the register/spill report, shown with -s or on failure
    rows = json.loads(next(line[5:] for line in proc.stdout.splitlines() if line.startswith("JSON:")))
    return proc, rows


def _check(proc, rows):
    assert rows, proc.stderr[-2000:]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    # the empirical-field kernels (flowkern/triton/fields.py) of every score kind
    fields = {r["kernel"].split("/")[1] for r in rows if r["kernel"].startswith("fields/")}
    assert fields == {"poisson", "gaussian", "uniform"}, fields
    for r in rows:
        assert r["parsed"], f"no ptxas report for {r['kernel']} {r['arch']}"
        assert r["spill_bytes"] == 0, f"{r['kernel']} {r['arch']} spills {r['spill_bytes']} bytes"
        assert r["stack_bytes"] == 0, f"{r['kernel']} {r['arch']} uses a stack frame"
        assert r["shared"] <= 99 * 1024 if r["arch"] == "sm_80" else r["shared"] <= 227 * 1024
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_aot_quick():
    _check(*_run("--quick"))


@pytest.mark.slow
def test_aot_full():
    _check(*_run())


def test_kernels_survive_inductors_regeneration():
    """torch.compile's Inductor rebuilds a user Triton kernel from its source
    with its constexprs written as Python literals: every op's kernel, in
    every dtype (one tile shape each), compiles that way to the same PTX
    (flowkern/triton/inductor_check.py; docs/design.md §5)."""
    proc = subprocess.run([sys.executable, "-m", "flowkern.triton.inductor_check", "--quick"],
                          capture_output=True, text=True, env=_compiling_env(), timeout=1200)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "configurations, 0 differ" in proc.stdout
