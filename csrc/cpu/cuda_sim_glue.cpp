// The CUDA glue (csrc/cuda/glue.h) on the grid simulator's launchers
// (cuda_sim_launchers.cpp), as the CPU kernels of a test namespace,
// flowkern_sim::, with the schemas of flowkern:: (schemas.h). The glue's
// argument handling, coefficient arguments, output allocation and launches
// then run on CPU tensors, "device" memory being host memory: what
// tests/test_cuda_glue.py compares with the reference. The guard and stream
// are no-ops; the grid is capped at 3 blocks so that every grid-stride loop
// runs more than once. Not public API.

#include "../cuda/glue.h"
#include "../cuda/launch_ops.h"
#include "schemas.h"

namespace flowkern_glue {
namespace {

struct SimDevice {
  struct Guard {
    explicit Guard(const Device&) {}
  };
  static uintptr_t stream(const Device&) { return 0; }
  static i64 max_blocks(const Device&) { return 3; }
  // As on a GPU: values in "device" memory are checked only with FLOWKERN_DEBUG=1.
  static bool values_on_device_checked() { return debug_checks(); }
};

struct SimLaunchers {
#define FK_LAUNCHER_NS fk_sim
  FK_ALL_LAUNCHERS(FK_FORWARD_LAUNCHER)
#undef FK_LAUNCHER_NS
  static const char* error_string(int code) {
    const char* m = fk_cuda::ops::code_message(code);
    return m != nullptr ? m : "unknown error";
  }
};

}  // namespace

STABLE_TORCH_LIBRARY(flowkern_sim, m) { flowkern_cpu::define_schemas(m); }

STABLE_TORCH_LIBRARY_IMPL(flowkern_sim, CPU, m) { Glue<SimDevice, SimLaunchers>::register_all(m); }

}  // namespace flowkern_glue
