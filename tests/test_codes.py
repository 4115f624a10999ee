"""The integer codes that cross into the kernels, held equal in every
language: prediction types (the rule book flowkern/_rules.py; coeffs.h Pred; Triton's
coeffs.py), EI forms (_rules.FORMS; steps.h EIForm), built-in schedule
kinds (schedules.py; schedules.h SchedKind; triton/schedules.py), the
custom-table kind (_rules.TABLE_KIND; coef_args.h kTableKind) and loss
reductions (_rules.REDUCTION_CODE; coef_checks.h Reduction). A code changed
in one place and not the others would select another formula silently."""
import os
import re

from flowkern import schedules
from flowkern._rules import FORMS, PRED_CODE, PREDICTIONS, REDUCTION_CODE, TABLE_KIND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _enum(src, name):
    """{member: value} of a C++ `enum name ... { A = 0, B = 1 };`."""
    body = re.search(r"enum " + name + r"\b[^{]*\{([^}]*)\}", src).group(1)
    return {m: int(v) for m, v in re.findall(r"(\w+)\s*=\s*(-?\d+)", body)}


def test_prediction_codes():
    cpp = _enum(_read("csrc", "include", "flowkern", "coeffs.h"), "Pred")
    assert cpp == {p.upper(): PRED_CODE[p] for p in PREDICTIONS}
    assert list(PRED_CODE.values()) == list(range(len(PREDICTIONS)))
    from flowkern.triton import coeffs, steps
    for name, code in cpp.items():
        assert getattr(coeffs, name).value == code
        assert getattr(steps, name) is getattr(coeffs, name)  # one definition


def test_form_codes():
    cpp = _enum(_read("csrc", "include", "flowkern", "steps.h"), "EIForm")
    assert cpp == {"EI_DATA": FORMS["data"], "EI_NOISE": FORMS["noise"]}


def test_schedule_kinds():
    cpp = _enum(_read("csrc", "include", "flowkern", "schedules.h"), "SchedKind")
    py = {cls.__name__.upper(): kind for cls, (kind, _) in schedules._NATIVE.items()}
    assert py == cpp
    table = re.search(r"constexpr int64_t kTableKind = (-?\d+);",
                      _read("csrc", "cpu", "coef_args.h")).group(1)
    assert int(table) == TABLE_KIND
    # Triton's in-kernel schedules (triton/schedules.py) and its engine's table kind
    from flowkern.triton import lincomb
    from flowkern.triton import schedules as tsched
    assert {name: getattr(tsched, name).value for name in cpp} == cpp
    assert lincomb.TABLE == TABLE_KIND and lincomb._TABLE.value == TABLE_KIND
    assert lincomb.TABLE not in cpp.values()


def test_reduction_codes():
    cpp = _enum(_read("csrc", "cpu", "coef_checks.h"), "Reduction")
    assert cpp == {k.upper(): v for k, v in REDUCTION_CODE.items()}


def test_conversion_divisors_are_one_rule():
    """csrc/cpu/coef_checks.h kDivides (the native training ops and steps)
    equals flowkern._rules.DIVIDES (the Python backends and the samplers),
    and both are what coeffs.h's formulas divide by: converting a random
    prediction at a time where the divisor is 0 gives a non-finite result
    exactly for the listed divisors."""
    import torch

    from flowkern._rules import DIVIDES
    from flowkern.reference.training import convert

    src = _read("csrc", "cpu", "coef_checks.h")
    bits = dict(re.findall(r"(BY_\w+)\s*=\s*(\d+)", src))
    rows = re.search(r"kDivides\[4\]\[4\]\s*=\s*\{(.*?)\};", src, re.S).group(1)
    cells = re.findall(r"\{([^{}]*)\}", rows)
    names = {"BY_SIGMA": "sigma", "BY_ALPHA": "alpha", "BY_DET": "det"}
    assert set(bits) == set(names)
    for i, s in enumerate(PREDICTIONS):
        for j, d in enumerate(PREDICTIONS):
            cell = cells[i].split(",")[j]
            cpp = {names[b] for b in re.findall(r"BY_\w+", cell)}
            assert cpp == set(DIVIDES[s, d]), (s, d, cpp, DIVIDES[s, d])
    # the formulas: (alpha, sigma, d_alpha, d_sigma) with one divisor made 0
    x, p = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    zero = {"sigma": (0.7, 0.0, 1.0, -1.0), "alpha": (0.0, 0.8, 1.0, -1.0),
            "det": (0.6, 0.3, 2.0, 1.0)}  # 0.6 * 1 - 0.3 * 2 = 0
    for (s, d), need in DIVIDES.items():
        for what, coef in zero.items():
            ct = torch.tensor([coef], dtype=torch.float64).expand(2, 4)
            out = convert(p, x, ct, s, d)
            assert bool(torch.isfinite(out).all()) == (what not in need), (s, d, what)


def test_schemas_are_written_once():
    """flowkern/ops/schemas.inc is the one list of op schemas: flowkern::
    (C++), flowkern_sim:: (the simulated CUDA glue) and flowkern_triton::
    (Python) all define exactly its ops with exactly its schemas, and no
    Python file declares a schema of its own (custom_op only in triton_op)."""
    import torch

    from flowkern.backend import cpu_built
    from flowkern.ops._registry import SCHEMAS

    lines = re.findall(r'^FK_SCHEMA\("([^"]*)"\)$', _read("flowkern", "ops", "schemas.inc"), re.M)
    assert len(lines) == len(set(lines)) > 20
    want = {s.split("(")[0]: str(torch._C.parse_schema(s)) for s in lines}
    assert set(SCHEMAS) == {n for n in want if "." not in n}

    def schema(ns, name):
        op, _, overload = name.partition(".")
        packet = getattr(getattr(torch.ops, ns), op)
        return str(getattr(packet, overload or "default")._schema).replace(f"{ns}::", "")

    for name in SCHEMAS:
        # flowkern_triton:: defines each op once, with its `.times` schema where
        # it has one (the steps' per-sample times), under the op's name
        full = want.get(name + ".times", want[name])
        assert schema("flowkern_triton", name) == full.replace(".times(", "(", 1)
    if cpu_built():
        for name in want:
            assert schema("flowkern", name) == want[name]
            assert schema("flowkern_sim", name) == want[name]
            # csrc/autograd/nograd.cpp (or its Python twin, flowkern/ops/_nograd.py)
            # derives its list from the same schemas
            if name.endswith("nograd") or "!)" in want[name]:
                assert torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"flowkern::{name}", "Autograd"), name
    declared = []
    for root, _, files in os.walk(os.path.join(ROOT, "flowkern")):
        for f in files:
            if f.endswith(".py") and "custom_op(" in open(os.path.join(root, f)).read():
                declared.append(f)
    assert declared == ["_registry.py"]


def test_row_function_codes_match_row_matrix():
    """flowkern/triton/kernels.py: row_matrix's branch for code n calls
    ROW_FNS[n], for every row function the launchers pass (a row function
    missing from the table would fail at its first launch, a swapped line
    would silently run another step)."""
    import inspect

    import pytest

    pytest.importorskip("triton")
    from flowkern.triton import kernels

    src = inspect.getsource(kernels.row_matrix.fn)
    calls = re.findall(r"ROW == (\d+)[^\n]*\n(?:[^\n]*\n)?\s+return (\w+)\(", src)
    assert [(int(code), name) for code, name in calls] == [
        (code, fn.fn.__name__) for code, fn in enumerate(kernels.ROW_FNS)]
    assert len(set(kernels.ROW_FNS)) == len(kernels.ROW_FNS)
