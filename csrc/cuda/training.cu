// CUDA launchers of the training op family (docs/design.md §4): the bodies of
// launch_ops.h on the GPU engine. The kernel bodies are the header thread
// functions (lincomb.h, rowsum.h) that the CPU grid simulator runs over the
// same plans (launch.h).
#include "gpu_engine.cuh"
#include "launch_ops.h"

namespace fk_cuda {
#define FK_ENGINE GpuEngine
FK_TRAINING_LAUNCHERS(FK_DEFINE_LAUNCHER)
}  // namespace fk_cuda
