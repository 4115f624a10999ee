"""Integer codes that cross into the kernels and the rules that go with them,
once for the Python layers; must match csrc/include/flowkern/coeffs.h (Pred)
and csrc/cpu/coef_checks.h (kDivides): tests/test_codes.py holds them equal."""

PREDICTIONS = ("velocity", "x1", "eps", "score")
PRED_CODE = {name: code for code, name in enumerate(PREDICTIONS)}

# What converting one prediction type into another divides by (the formulas
# of csrc/include/flowkern/coeffs.h convert_coeffs; docs/design.md §3):
# "sigma" (sigma_t), "alpha" (alpha_t), "det" (alpha d_sigma - sigma d_alpha).
# Rows: the source type, columns: the target, in PREDICTIONS order.
_DIVIDES_BY = (
    ((), ("det",), ("det",), ("det", "sigma")),
    (("sigma",), (), ("sigma",), ("sigma",)),
    (("alpha",), ("alpha",), (), ("sigma",)),
    (("alpha",), ("alpha",), (), ()),
)
DIVIDES = {(s, d): frozenset(_DIVIDES_BY[i][j]) for i, s in enumerate(PREDICTIONS)
           for j, d in enumerate(PREDICTIONS)}
