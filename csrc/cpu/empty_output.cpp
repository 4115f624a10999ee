// flowkern::empty_output: a fresh contiguous tensor shaped like `like`, on
// huge pages when large (dispatch.h empty_output). The Python layer allocates
// the step ops' large outputs through it (flowkern/ops/_registry.py).

#include "dispatch.h"

namespace flowkern_cpu {
namespace {
Tensor empty_output_op(const Tensor& like) { return empty_output(like); }
}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(flowkern, m) { m.def("empty_output(Tensor like) -> Tensor"); }

STABLE_TORCH_LIBRARY_IMPL(flowkern, CPU, m) { m.impl("empty_output", TORCH_BOX(&empty_output_op)); }

}  // namespace flowkern_cpu
