"""The integer codes that cross into the kernels, held equal in every
language: prediction types (flowkern/_enums.py; coeffs.h Pred; Triton's
coeffs.py), EI forms (ops/steps.py FORMS; steps.h EIForm), built-in
schedule kinds (schedules.py; schedules.h SchedKind; triton/schedules.py), the custom-table kind
(ops/training.py TABLE_KIND; coef_args.h kTableKind) and loss reductions
(ops/training.py REDUCTION_CODE; coef_checks.h Reduction). A code changed
in one place and not the others would select another formula silently."""
import os
import re

from flowkern import schedules
from flowkern._enums import PRED_CODE, PREDICTIONS
from flowkern.ops.steps import FORMS
from flowkern.ops.training import REDUCTION_CODE, TABLE_KIND

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
    equals flowkern._enums.DIVIDES (the Python backends and the samplers),
    and both are what coeffs.h's formulas divide by: converting a random
    prediction at a time where the divisor is 0 gives a non-finite result
    exactly for the listed divisors."""
    import torch

    from flowkern._enums import DIVIDES
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
