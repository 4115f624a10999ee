"""flowkern: fused kernels for flow-matching and diffusion models.

Public API; see README.md for the conventions (t = 0 noise, t = 1 data,
x_t = alpha_t x1 + sigma_t x0) and the backend table.
"""
from . import grids, samplers, sampling, schedules
from .backend import BACKENDS, available, use_backend
from .ops.fields import empirical_denoiser, poisson_field
from .ops.flowmap import flowmap_loss
from .ops.steps import (churn, dpmpp_2m_step, ei_step, em_step, euler_step, heun_step,
                        lincomb_step, lms_step, step_table)
from .ops.training import convert, flow_matching_loss, interpolate
from .ops import batching as _batching  # noqa: F401  (vmap rules of the ops above)
from .sampling import sample
from .schedules import get_schedule
from . import flowmap, meanflow, pfgm, rectified, shortcut  # noqa: E402  (after the ops they build on)

__version__ = "0.1.0"

__all__ = [
    "interpolate", "flow_matching_loss", "convert",
    "poisson_field", "empirical_denoiser", "pfgm",
    "euler_step", "heun_step", "ei_step", "dpmpp_2m_step", "em_step", "churn", "lms_step",
    "lincomb_step", "step_table",
    "flowmap_loss", "rectified", "flowmap", "meanflow", "shortcut",
    "sample", "grids", "sampling", "samplers", "schedules", "get_schedule", "use_backend", "available", "BACKENDS",
]
