// Decoding the launchers' plain arguments in the .cu files: the stream as an
// integer, plus the dtype dispatch and pointer casts of launch_ops.h.
// Internal linkage, as in lincomb_kernel.cuh.
#pragma once

#include <cuda_runtime.h>

#include "launch_ops.h"
#include "launchers.h"

namespace fk_cuda {
namespace {

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

using ops::dispatch_dtype;
using ops::in_ptr;
using ops::out_ptr;

}  // namespace
}  // namespace fk_cuda
