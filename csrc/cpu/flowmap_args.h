// The argument checks of the flow-map ops, shared by the CPU ops
// (flowmap.cpp) and the CUDA glue (csrc/glue/glue.h). User-facing validation
// is in flowkern/ops/flowmap.py; these guard direct callers of
// torch.ops.flowkern.*.
#pragma once

#include "dispatch.h"
#include "flowkern/steps.h"

namespace flowkern_cpu {

struct FlowmapArgs {
  Tensor x, pred, target, coef;
  i64 stride;
};

inline FlowmapArgs flowmap_args(const char* op, const Tensor& x, const Tensor& pred,
                                 const Tensor& target, const Tensor& coef) {
  const auto want = x.scalar_type() == kDouble ? kDouble : kFloat;
  FK_CHECK(coef.scalar_type() == want && coef.dim() == 2 && coef.size(1) == fk::STEP_COLS &&
               (coef.size(0) == 1 || coef.size(0) == rows_of(x)),
           op, ": coef must be a (1 or B, ", fk::STEP_COLS, ") step table of dtype ", want);
  for (const Tensor* t : {&pred, &target, &coef})
    FK_CHECK(t->device() == x.device(), op, ": pred, target and coef must be on x's device");
  for (const Tensor* t : {&pred, &target})
    FK_CHECK(same_sizes(t->sizes(), x.sizes()) && t->scalar_type() == x.scalar_type(), op,
             ": pred and target must match x in shape and dtype");
  return {contig(x), contig(pred), contig(target), contig(coef),
          coef.size(0) == 1 ? 0 : fk::STEP_COLS};
}

}  // namespace flowkern_cpu
