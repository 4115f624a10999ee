"""The ``cuda`` backend: CUDA C++ kernels from the shared math headers
(docs/design.md §5). Importing this package does not load flowkern._cuda; the first
call does, and raises RuntimeError naming the fallback if it cannot."""
from .fields import field_mean
from .flowmap import flowmap_loss_backward, flowmap_loss_rows
from .steps import (churn, dpmpp_2m_step, ei_step, ei_step_backward, ei_step_out, em_step,
                    euler_step, heun_step)
from .training import (convert, convert_backward, fm_loss, fm_loss_backward, fm_loss_rows,
                       interpolate, interpolate_backward, interpolate_out)

__all__ = ["interpolate", "interpolate_out", "interpolate_backward", "convert",
           "convert_backward", "fm_loss", "fm_loss_rows", "fm_loss_backward",
           "euler_step", "heun_step", "ei_step", "ei_step_out", "ei_step_backward",
           "dpmpp_2m_step", "em_step", "churn", "flowmap_loss_rows", "flowmap_loss_backward",
           "field_mean"]
