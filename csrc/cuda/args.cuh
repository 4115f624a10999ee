// Decoding the launchers' plain arguments (launchers.h): dtype codes, device
// pointers and the stream as integers. Shared by the .cu files of every op
// family; internal linkage, as in lincomb_kernel.cuh.
#pragma once

#include <cuda_runtime.h>

#include "flowkern/coeffs.h"
#include "flowkern/steps.h"
#include "launchers.h"

namespace fk_cuda {
namespace {

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <class T> const T* in_ptr(dptr p) { return reinterpret_cast<const T*>(p); }
template <class T> T* out_ptr(dptr p) { return reinterpret_cast<T*>(p); }

template <class T> struct Tag { using type = T; };

// Storage type of a dtype code; 16-bit floats as the header's bit-compatible
// structs (fk::f16, fk::bf16).
template <class F> int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(Tag<float>{});
    case 1: return f(Tag<double>{});
    case 2: return f(Tag<fk::f16>{});
    case 3: return f(Tag<fk::bf16>{});
    default: return kBadDtype;
  }
}

inline bool is_pred(int code) { return code >= fk::VELOCITY && code <= fk::SCORE; }

inline bool is_form(int form) { return form == fk::EI_DATA || form == fk::EI_NOISE; }

}  // namespace
}  // namespace fk_cuda
