// CUDA launchers of the flow-map op family (docs/design.md §4: the one-step
// flow map g(t, s, x), ei_step's exponential-integrator map, against a
// target): the bodies of launch_ops.h on the GPU engine; the backward's
// functor comes from fk::with_flowmap_bwd_fn, as on the CPU.
#include "gpu_engine.cuh"
#include "launch_ops.h"

namespace fk_cuda {
#define FK_ENGINE GpuEngine
FK_FLOWMAP_LAUNCHERS(FK_DEFINE_LAUNCHER)
}  // namespace fk_cuda
