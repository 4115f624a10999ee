// The flowkern:: ops' kernels for the CUDA dispatch key: the glue (glue.h) on
// the GPU launchers (launchers.h, the nvcc-compiled .cu files), with torch's
// device guard and current stream taken through c10's device-generic
// interfaces (no CUDA headers, no link against c10_cuda). Built into
// flowkern._C only when the torch it builds against has CUDA (setup.py).
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "glue.h"

namespace flowkern_glue {
namespace {

struct CudaDevice {
  using Guard = c10::DeviceGuard;
  // torch's current stream of the device (torch.cuda.current_stream(d)).
  static uintptr_t stream(const at::Device& d) {
    const c10::impl::VirtualGuardImpl impl(d.type());
    return reinterpret_cast<uintptr_t>(impl.getStream(d).native_handle());
  }
  // Two waves of 256-thread blocks at full occupancy (fk::kDefaultMaxBlocks's reasoning).
  static i64 max_blocks(const at::Device& d) {
    const int n = fk_cuda::multiprocessor_count(d.index());
    return n > 0 ? i64(n) * 16 : 0;
  }
  static bool values_on_device_checked() { return debug_checks(); }
};

struct CudaLaunchers {
#define FK_LAUNCHER_NS fk_cuda
  FK_ALL_LAUNCHERS(FK_FORWARD_LAUNCHER)
#undef FK_LAUNCHER_NS
  static const char* error_string(int code) { return fk_cuda::error_string(code); }
};

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { Glue<CudaDevice, CudaLaunchers>::register_all(m); }

}  // namespace flowkern_glue
