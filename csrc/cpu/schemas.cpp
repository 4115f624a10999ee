// flowkern:: — every op's schema, defined once (flowkern/ops/schemas.inc via
// schemas.h). The families' files register their kernels for it
// (training.cpp, steps.cpp, flowmap.cpp, fields.cpp; the CUDA kernels in
// csrc/cuda/register.cpp).

#include "schemas.h"
#include "tensor.h"

STABLE_TORCH_LIBRARY_FRAGMENT(flowkern, m) { flowkern_cpu::define_schemas(m); }
