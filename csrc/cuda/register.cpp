// The flowkern:: ops' kernels for the CUDA dispatch key: the glue (glue.h) on
// the GPU launchers (launchers.h, the nvcc-compiled .cu files), with torch's
// device guard and current stream taken through the stable ABI (no CUDA
// headers, no link against torch's CUDA libraries). Built into flowkern._C
// only when the torch it builds against has CUDA (setup.py).
//
// The stream comes from the shim's aoti_torch_get_current_cuda_stream, which
// only a CUDA build of torch exports: it is looked up when first needed, so
// the same module still loads into a CPU-only torch (where no CUDA tensor,
// hence no call of these kernels, can exist).
#include <dlfcn.h>

#include <torch/csrc/stable/accelerator.h>

#include "glue.h"

namespace flowkern_glue {
namespace {

struct CudaDevice {
  struct Guard {
    torch::stable::accelerator::DeviceGuard g;
    explicit Guard(const Device& d) : g(d.index()) {}
  };
  // torch's current stream of the device (torch.cuda.current_stream(d)).
  static uintptr_t stream(const Device& d) {
    using Get = AOTITorchError (*)(int32_t, void**);
    static const Get get = [] {
      const char* name = "aoti_torch_get_current_cuda_stream";
      void* f = dlsym(RTLD_DEFAULT, name);
      if (f == nullptr)  // libtorch_cuda loaded, but not into the global scope
        if (void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD)) f = dlsym(lib, name);
      return reinterpret_cast<Get>(f);
    }();
    FK_CHECK(get != nullptr, "flowkern: this torch exports no CUDA stream (a CPU-only build?)");
    void* s = nullptr;
    FK_SHIM_CHECK(get(int32_t(d.index()), &s));
    return reinterpret_cast<uintptr_t>(s);
  }
  // Two waves of 256-thread blocks at full occupancy (fk::kDefaultMaxBlocks's reasoning).
  static i64 max_blocks(const Device& d) {
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

STABLE_TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { Glue<CudaDevice, CudaLaunchers>::register_all(m); }

}  // namespace flowkern_glue
