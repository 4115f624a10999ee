"""Packaging: `pip wheel .` builds a wheel that installs into a fresh venv
with torch and passes a smoke test (the CPU kernels run; the public API
imports without triton or a GPU)."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = textwrap.dedent("""
    import torch, flowkern as fk
    assert fk.available()["cpu"], fk.available()
    x0, x1 = torch.randn(4, 9), torch.randn(4, 9)
    t = torch.rand(4)
    xt, y = fk.interpolate(x0, x1, t, backend="cpu")
    torch.testing.assert_close(xt, t[:, None] * x1 + (1 - t[:, None]) * x0)
    torch.testing.assert_close(y, x1 - x0)
    print("smoke ok", fk.__version__, fk.available())
""")


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(tmp, env):
    src = tmp / "src"
    # build from a clean copy of the tracked tree, as a user's `pip wheel .` would
    files = _run(["git", "ls-files"], cwd=ROOT).stdout.split()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "dist")], cwd=src, env=env)
    wheels = list((tmp / "dist").glob("flowkern-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _fresh_venv_smoke(tmp, wheel, extra=""):
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    import torch
    _run(pip + [f"torch=={torch.__version__.split('+')[0]}"])
    _run(pip + ["--no-deps", str(wheel)])
    out = _run([str(venv / "bin" / "python"), "-c", SMOKE + extra], cwd=tmp).stdout
    assert "smoke ok" in out


def test_wheel_installs_in_fresh_venv(tmp_path):
    env = dict(os.environ, FLOWKERN_SKIP_CUDA="1")
    wheel = _build_wheel(tmp_path, env)
    # one wheel for every CPython >= 3.10 (the limited API; docs/build.md)
    assert "-cp310-abi3-" in wheel.name, wheel.name
    _fresh_venv_smoke(tmp_path, wheel)


@pytest.mark.slow
def test_wheel_with_cuda_module(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    wheel = _build_wheel(tmp_path, dict(os.environ))
    # The CUDA kernels are part of flowkern._C, registered for the CUDA key.
    _fresh_venv_smoke(tmp_path, wheel, extra="from flowkern.backend import cuda_built\n"
                                              "assert cuda_built(), 'no CUDA kernels in _C'\n")
