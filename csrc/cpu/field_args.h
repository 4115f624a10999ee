// The argument checks of flowkern::field_mean, shared by the CPU op
// (fields.cpp) and the CUDA glue (csrc/glue/glue.h).
#pragma once

#include "tensor.h"

namespace flowkern_cpu {

// x (B, N) queries, ref (R >= 1, N) references of x's dtype, qp (B, 2) in
// the accumulation dtype, kind 0 (poisson), 1 (gaussian) or 2 (uniform).
inline void check_field_args(const Tensor& x_, const Tensor& ref_, const Tensor& qp_,
                             int64_t kind) {
  FK_CHECK(x_.dim() == 2 && ref_.dim() == 2 && x_.size(1) == ref_.size(1),
           "field_mean: x must be (B, N) and ref (R, N)");
  FK_CHECK(x_.scalar_type() == ref_.scalar_type(), "field_mean: x and ref must share a dtype");
  const auto acc = x_.scalar_type() == kDouble ? kDouble : kFloat;
  FK_CHECK(qp_.scalar_type() == acc && qp_.dim() == 2 && qp_.size(0) == x_.size(0) &&
               qp_.size(1) == 2,
           "field_mean: qp must be (B, 2) in the accumulation dtype ", acc);
  FK_CHECK(ref_.size(0) > 0, "field_mean: the reference set is empty");
  FK_CHECK(kind >= 0 && kind <= 2, "field_mean: kind must be 0 (poisson), 1 (gaussian) or "
           "2 (uniform)");
}

}  // namespace flowkern_cpu
