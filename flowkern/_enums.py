"""Integer codes that cross into the kernels; must match csrc/include/flowkern/coeffs.h."""

PREDICTIONS = ("velocity", "x1", "eps", "score")
PRED_CODE = {name: code for code, name in enumerate(PREDICTIONS)}
