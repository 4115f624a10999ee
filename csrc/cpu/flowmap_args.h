// The argument checks of the flow-map ops, shared by the CPU ops
// (flowmap.cpp) and the CUDA glue (csrc/glue/glue.h). User-facing validation
// is in flowkern/ops/flowmap.py; these guard direct callers of
// torch.ops.flowkern.*.
#pragma once

#include <ATen/core/Tensor.h>

#include "dispatch.h"
#include "flowkern/steps.h"

namespace flowkern_cpu {

struct FlowmapArgs {
  at::Tensor x, pred, target, coef;
  i64 stride;
};

inline FlowmapArgs flowmap_args(const char* op, const at::Tensor& x, const at::Tensor& pred,
                                 const at::Tensor& target, const at::Tensor& coef) {
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef.scalar_type() == want && coef.dim() == 2 && coef.size(1) == fk::STEP_COLS &&
                  (coef.size(0) == 1 || coef.size(0) == rows_of(x)),
              op, ": coef must be a (1 or B, ", fk::STEP_COLS, ") step table of dtype ", want);
  for (const at::Tensor* t : {&pred, &target, &coef})
    TORCH_CHECK(t->device() == x.device(), op, ": pred, target and coef must be on x's device");
  for (const at::Tensor* t : {&pred, &target})
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(), op,
                ": pred and target must match x in shape and dtype");
  return {x.contiguous(), pred.contiguous(), target.contiguous(), coef.contiguous(),
          coef.size(0) == 1 ? 0 : fk::STEP_COLS};
}

}  // namespace flowkern_cpu
