"""flowkern.samplers: the sampling loops' former home, kept for its users;
they live in :mod:`flowkern.sampling` (one function per method)."""
from .sampling import (METHODS, clear_graph_cache, sample, sample_dpmpp_2m, sample_ei,
                       sample_em, sample_euler, sample_heun)

__all__ = ["sample", "sample_euler", "sample_heun", "sample_ei", "sample_dpmpp_2m", "sample_em",
           "METHODS", "clear_graph_cache"]
