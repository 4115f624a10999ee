// The Autograd-key kernel of every `.nograd` overload (flowkern/ops/_registry.py
// register(nograd=True)): the public functions call these overloads when no
// input needs a gradient, to skip the Python autograd kernel of the default
// overload (~10 us a call). Here, in C++, an input that does need one is a
// clear error rather than a silently missing gradient; otherwise the call
// goes straight on to the CPU / CUDA kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace flowkern_cpu {
namespace {

bool needs_grad(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor().requires_grad();
  if (v.isTensorList())
    for (const at::Tensor& t : v.toTensorList()) if (t.requires_grad()) return true;
  return false;
}

void nograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                   torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const size_t n = op.schema().arguments().size();
    for (size_t i = stack->size() - n; i < stack->size(); ++i)
      TORCH_CHECK(!needs_grad((*stack)[i]), op.schema().name(), ".nograd: argument '",
                  op.schema().arguments()[i - (stack->size() - n)].name(),
                  "' requires grad; call the default overload, which is differentiable");
  }
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  for (const char* name : {"interpolate.nograd", "convert.nograd", "fm_loss.nograd", "ei_step.nograd"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&nograd_kernel>());
}

}  // namespace flowkern_cpu
