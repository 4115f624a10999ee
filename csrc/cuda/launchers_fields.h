// Host entry points of the empirical-field kernels (fields.cu), callable from
// g++ code (bindings_fields.cpp) without torch or CUDA headers; conventions
// (pointers and the stream as uintptr_t, dtype codes, cudaError_t results) as
// launchers.h.
#pragma once

#include "launchers.h"

namespace fk_cuda {

// (mean, best, sumexp) of flowkern::field_mean (csrc/cpu/fields.cpp): x (rows,
// inner) queries, ref (R, inner) references, qp (rows, 2) score parameters,
// the three outputs (rows, inner), (rows,), (rows,), all in the accumulation
// dtype. kind: 0 poisson, 1 gaussian, 2 uniform (fk::FieldKind). `splits`
// reference ranges per query block, normalised as fk::plan_fields does; more
// than one needs `workspace`, workspace_size >= the plan's workspace elements
// of the accumulation dtype.
int field_mean(int dtype, i64 rows, i64 inner, i64 R, dptr x, dptr ref, dptr qp, int kind,
               double p0, double p1, dptr mean, dptr best, dptr sumexp, dptr workspace,
               i64 workspace_size, i64 splits, uintptr_t stream);

}  // namespace fk_cuda
