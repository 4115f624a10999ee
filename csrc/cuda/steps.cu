// CUDA launchers of the sampler-step family (docs/design.md §4 "Sampling"):
// the bodies of launch_ops.h, whose functors come from fk::with_step_fn
// (flowkern/step_launch.h) as in the CPU ops and the grid simulator, on the
// GPU engine.
#include "gpu_engine.cuh"
#include "launch_ops.h"

namespace fk_cuda {
#define FK_ENGINE GpuEngine
FK_STEP_LAUNCHERS(FK_DEFINE_LAUNCHER)
}  // namespace fk_cuda
