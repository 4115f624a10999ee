// Messages of the launchers' return codes, and the device facts the glue
// needs without CUDA headers (launchers.h).
#include <cuda_runtime.h>

#include "launch_ops.h"
#include "launchers.h"

namespace fk_cuda {

const char* error_string(int code) {
  if (const char* m = ops::code_message(code)) return m;
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int multiprocessor_count(int device) {
  // Cached: the glue asks on every launch (grid size), cudaDeviceGetAttribute
  // costs a driver call. Races only write the same value.
  static int cache[64] = {};
  if (device < 0 || device >= 64) return 0;
  if (cache[device] > 0) return cache[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // clear it: the launch that follows reports its own error
    return 0;
  }
  cache[device] = n;
  return n;
}

}  // namespace fk_cuda
