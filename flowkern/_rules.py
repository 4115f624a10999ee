"""The rule book: every integer code that crosses into the kernels and every
rule that goes with it, once for the Python layers (docs/design.md §3, §6).

- prediction types and their codes (csrc/include/flowkern/coeffs.h Pred,
  flowkern/triton/coeffs.py);
- what converting one prediction type into another divides by (coeffs.h
  convert_coeffs; csrc/cpu/coef_checks.h kDivides);
- the exponential integrator's forms (steps.h EIForm) and the form a
  prediction type is integrated in;
- loss reductions (coef_checks.h Reduction) and the custom-table kind
  (coef_args.h kTableKind);
- the validators of these arguments and of Philox seeds (step_args.h
  step_seeds holds the seed rule for seeds in a tensor).

tests/test_codes.py holds the C++ and Triton constants equal to these."""

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

# The exponential integrator's forms (ei_step, flowmap_loss): "data" steps an
# x1-prediction (divides by sigma_t), "noise" an eps-prediction (by alpha_t).
FORMS = {"data": 0, "noise": 1}
FORM_NAMES = {code: name for name, code in FORMS.items()}

REDUCTIONS = ("mean", "sum", "none")
REDUCTION_CODE = {name: code for code, name in enumerate(REDUCTIONS)}

TABLE_KIND = -1  # the schedule kind of a caller's coefficient table (kTableKind)


def default_form(prediction: str) -> str:
    """The form a model of this prediction type is integrated in: data for x1
    and velocity predictions, noise for eps and score."""
    return "data" if prediction in ("x1", "velocity") else "noise"


def prediction(name: str, value: str) -> int:
    """The code of a prediction type, or a ValueError naming the argument."""
    try:
        return PRED_CODE[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name}: unknown prediction type {value!r}; expected one of "
                         f"{PREDICTIONS}") from None


def form(value: str) -> int:
    """The code of an exponential-integrator form."""
    try:
        return FORMS[value]
    except (KeyError, TypeError):
        raise ValueError(f"form: expected 'data' or 'noise', got {value!r}") from None


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {value!r}")
    return value


def seed(name: str, value, optional: bool = False, at=None) -> int:
    """A Philox seed or offset: an int in [0, 2^63) (None allowed when
    `optional`; `at`: the sample of a per-sample seed). The one rule of every
    seed= / offset= / per_sample_seeds=."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        what = "None or an int" if optional else "an int" if at is None else "ints"
        where = "" if at is None else f" at sample {at}"
        raise ValueError(f"{name}: expected {what} in [0, 2^63), got {value!r}{where}")
    return value
