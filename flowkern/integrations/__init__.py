"""Adapters that let existing users of other libraries run flowkern's fused
steps without changing their code (docs/design.md §1 maps the conventions):

- :mod:`flowkern.integrations.diffusers`: ``FlowMatchEulerDiscreteScheduler``,
  ``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``,
  ``EulerAncestralDiscreteScheduler``, ``DDIMScheduler``,
  ``FlowMatchHeunDiscreteScheduler`` and ``UniPCMultistepScheduler``, real
  diffusers schedulers.
- :mod:`flowkern.integrations.k_diffusion`: ``sample_euler``,
  ``sample_heun``, ``sample_dpmpp_2m``, ``sample_euler_ancestral``,
  ``sample_dpm_2``, ``sample_dpm_2_ancestral``, ``sample_dpmpp_2s_ancestral``,
  ``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``,
  ``sample_lms``, ``sample_dpm_fast``, ``sample_dpm_adaptive`` with
  k-diffusion's signatures.
- :mod:`flowkern.integrations.flow_matching`: ``AffineProbPath`` /
  ``CondOTProbPath`` and ``ODESolver`` with flow_matching's interface.

The diffusers adapters are diffusers schedulers (SchedulerMixin +
ConfigMixin), so that submodule needs diffusers; the k-diffusion and
flow_matching adapters do not import their peers (only the tests compare
against them). The submodules are imported on first attribute access.
"""
import importlib

_SUBMODULES = ("diffusers", "k_diffusion", "flow_matching")

__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
