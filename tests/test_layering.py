"""The library stands apart from its demo: no module of flowkern outside
flowkern/demo/ imports it (the `python -m flowkern` entry point only
dispatches to it), and importing flowkern and its public modules loads none
of it."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "flowkern"
DEMO_IMPORT = re.compile(r"^\s*(from\s+(\.+demo|flowkern\.demo|\.\.?\s+import\s+demo)\b|"
                         r"import\s+flowkern\.demo\b|from\s+\.\s+import\s+.*\bdemo\b)", re.M)


def test_no_library_module_imports_the_demo():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "demo" or rel.name == "__main__.py":
            continue
        if DEMO_IMPORT.search(path.read_text()):
            offenders.append(str(rel))
    assert not offenders, offenders


def test_importing_the_library_loads_no_demo_module():
    code = ("import sys, flowkern, flowkern.flowmap, flowkern.pfgm, flowkern.rectified, "
            "flowkern.meanflow, flowkern.shortcut, flowkern.samplers, flowkern.sampling\n"
            "print(sorted(m for m in sys.modules if m.startswith('flowkern.demo')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


def test_the_detector_sees_a_demo_import():
    for line in ("from .demo import toy", "from ..demo.toy import MLP", "import flowkern.demo",
                 "from flowkern.demo import main", "from . import demo"):
        assert DEMO_IMPORT.search(line), line
    assert not DEMO_IMPORT.search("from .demographics import x")
