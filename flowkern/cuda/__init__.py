"""The ``cuda`` backend: CUDA C++ kernels from the shared math headers
(DESIGN §5). Importing this package does not load flowkern._cuda; the first
call does, and raises RuntimeError naming the fallback if it cannot."""
from .training import (convert, convert_backward, fm_loss_backward, fm_loss_rows,
                       interpolate, interpolate_backward)

__all__ = ["interpolate", "interpolate_backward", "convert", "convert_backward",
           "fm_loss_rows", "fm_loss_backward"]
