// Messages of the launchers' return codes (launchers.h).
#include <cuda_runtime.h>

#include "launchers.h"

namespace fk_cuda {

const char* error_string(int code) {
  switch (code) {
    case kBadDtype: return "unsupported dtype code (expected 0=float32, 1=float64, 2=float16, 3=bfloat16)";
    case kBadPred: return "unknown prediction/target code (expected 0=velocity, 1=x1, 2=eps, 3=score)";
    case kGridTooLarge: return "rows * chunks exceeds the CUDA grid limit of 2^31 - 1 blocks";
    case kBadForm: return "unknown exponential-integrator form (expected 0=data, 1=noise)";
    case kBadTable: return "step table rows must be 1 (shared by the batch) or the batch size";
    case kBadTensors: return "the given tensors do not fit the launch (a step's unconditional "
                             "predictions: both or neither; every required tensor non-null)";
    case kBadKind: return "unknown field kind (expected 0=poisson, 1=gaussian, 2=uniform)";
    case kBadSizes: return "bad field sizes (need at least one reference and rows, inner >= 0)";
    case kBadWorkspace: return "the field workspace is missing or smaller than the plan's "
                               "(plan_fields)";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

}  // namespace fk_cuda
