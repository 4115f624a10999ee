"""The pure-PyTorch reference: readable, float64-capable, written like the
papers' formulas. It is the ground truth of every test and the ``torch``
backend. Same names as flowkern.ops."""
from .training import convert, flow_matching_loss, interpolate, target  # noqa: F401
